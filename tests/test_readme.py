"""Every ```python block of README.md runs as a reader would copy it, and shows what it
says it shows.

Each block runs in a folder of its own (a block that reads files writes them first):

- a block of ``>>>`` lines runs through doctest, so its outputs are the README's;
- a block with ``if __name__ == "__main__":`` runs as a script in its own process (the
  Dask example: ``Client()`` starts worker processes, which import the script);
- a block on the GPU (``device="cuda"``) runs only where a CUDA GPU is usable;
- any other block runs in this process.

A block that imports a package that is not installed is skipped, naming it.

A comment ``# EXPR ≈ NUMBER`` (or ``# EXPR == NUMBER``) in a block is a claim: once the
block has run, EXPR, evaluated among the block's names, must equal NUMBER to the digits
quoted (half a unit of the last one, plus float32 rounding).  Every ``≈`` in a comment
must be part of a claim.  Every block must show something that is checked: doctest
output, a claim, or an entry in ``EXTRA`` (more assertions, keyed by a snippet of code
that occurs in exactly one block), so that a new block without any is a failure.
"""

import ast
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import tokenize
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
ROOT = README.parent

# EXPR: a name with attributes, then at most one index or call: ppl, res.accuracy[1],
# float(loss).  NUMBER: as quoted, its last digit setting the tolerance.
_CLAIM = re.compile(r"([A-Za-z_][\w.]*(?:\[[^\]\n]*\]|\([^)\n]*\))?)\s*(≈|==)\s*"
                    r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")
# float32 results (and the last bits of sums that move with the CPU's vector width)
_REL_SLACK = 1e-5


class Block:
    """One ```python block: its place, its source and how it runs."""

    def __init__(self, index, line, src):
        self.index, self.line, self.src = index, line, src
        code = [ln.strip() for ln in src.splitlines() if ln.strip()]
        self.doctest = bool(code) and code[0].startswith(">>>")
        self.gpu = any(m in src for m in ('device="cuda"', 'backend="cuda"', "torch.cuda",
                                          ".cuda("))
        self.script = re.search(r"^if __name__ == .__main__.:", src, re.M) is not None
        first = next((ln for ln in code if not re.match(r"(>>> )?(import|from) ", ln)),
                     code[0] if code else "")
        self.id = f"block{index}-" + re.sub(r"\W+", "-", first.lstrip(">. "))[:36].strip("-")

    @property
    def kind(self):
        return ("doctest" if self.doctest else "gpu" if self.gpu else
                "script" if self.script else "here")

    def __repr__(self):
        return f"README.md block {self.index} (line {self.line}, {self.kind})"


def python_blocks(text):
    """The ```python blocks of a markdown text, in order."""
    blocks, src, start = [], None, 0
    for n, line in enumerate(text.splitlines(), 1):
        if src is None and line.strip() == "```python":
            src, start = [], n + 1
        elif src is not None and line.strip() == "```":
            blocks.append(Block(len(blocks), start, "\n".join(src) + "\n"))
            src = None
        elif src is not None:
            src.append(line)
    assert src is None, f"README.md: the ```python block at line {start} is not closed"
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def comments(src):
    """The text of each comment of a block of Python source."""
    return [tok.string for tok in tokenize.generate_tokens(io.StringIO(src).readline)
            if tok.type == tokenize.COMMENT]


def claims(src):
    """(expression, operator, number) for each claim in the comments of ``src``; an
    ``≈`` that is not part of a claim is an error, never a claim left unchecked."""
    out = []
    for c in comments(src):
        found = _CLAIM.findall(c)
        assert c.count("≈") == sum(op == "≈" for _, op, _ in found), \
            f"a comment with an unreadable claim (want '# EXPR ≈ NUMBER'): {c!r}"
        out += found
    return out


def check_claim(expr, op, quoted, value):
    """Assert that ``value`` (EXPR's) is what the README quotes."""
    want = float(quoted)
    if op == "==":
        assert value == want, f"README says {expr} == {quoted}; it is {value!r}"
        return
    unit = 10.0 ** Decimal(quoted).as_tuple().exponent
    tol = 0.5 * unit + _REL_SLACK * abs(want)
    assert math.isfinite(value) and abs(value - want) <= tol, \
        f"README says {expr} ≈ {quoted}; it is {value!r} (tolerance {tol:.2g})"


def imported_modules(src):
    """The top-level packages a block imports."""
    lines = src.splitlines()
    if src.lstrip().startswith(">>>"):
        lines = [ln.strip()[4:] for ln in lines if ln.strip().startswith((">>> ", "... "))]
    names = set()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def missing_packages(block):
    need = imported_modules(block.src) | ({"zarr"} if ".zarr" in block.src else set())
    return sorted(m for m in need if importlib.util.find_spec(m) is None)


def no_gpu_reason():
    """Why a GPU block cannot run here, or None where a CUDA GPU is usable."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "Numba's CUDA simulator is not a GPU"
    if importlib.util.find_spec("numba_cuda") is None:
        return "numba-cuda is not installed (pip install 'xent_fast[cuda]')"
    from numba import cuda

    if not cuda.is_available():
        return "no usable CUDA GPU"
    torch = sys.modules.get("torch")
    if torch is not None and not torch.cuda.is_available():
        return "PyTorch here has no CUDA"
    return None


# ---------------------------------------------------------------------------- extra checks
# More than the claims say, keyed by a snippet of code that occurs in exactly one block;
# each gets the block's names after it ran.
def _first_example(ns):
    # the in-place gradient (written last, into the logits) is the returned one (every
    # 41st row: comparing all 131M elements in float64 takes seconds)
    np.testing.assert_allclose(ns["logits"][::41], ns["grad"][::41], rtol=1e-6, atol=1e-12)
    assert ns["grad"] is not ns["logits"]
    assert ns["grad"].dtype == np.float32 and ns["grad"].shape == (4096, 32000)


def _gpu_example(ns):
    torch = sys.modules["torch"]
    loss = ns["loss"]
    assert isinstance(loss, torch.Tensor) and loss.is_cuda and loss.dim() == 0
    # standard normal logits: the mean loss is about log C + 1/2 (std 1/sqrt(8192))
    assert abs(float(loss) - (math.log(128256) + 0.5)) < 0.06
    assert ns["grad"].data_ptr() == ns["logits"].data_ptr()
    assert ns["res"].count == 8192


def _evaluate_example(ns):
    res, rows = ns["res"], ns["rows"]
    assert int(rows["ignored"].sum()) == 100 and rows["loss"].shape == (10_000,)
    assert np.isclose(np.nanmean(rows["loss"]), res.cross_entropy, rtol=1e-12)
    kept = ~rows["ignored"]
    assert np.isclose(np.mean(rows["rank"][kept] == 0), res.accuracy[1], rtol=1e-12)


def _evaluate_file_example(ns):
    xf = ns["xf"]
    want = xf.evaluate(np.load("logits.npy"), np.load("targets.npy"))
    got = ns["res"]
    assert got.count == want.count == 20_000
    for name in ("cross_entropy", "perplexity", "entropy", "target_prob", "ece"):
        assert np.isclose(getattr(got, name), getattr(want, name), rtol=1e-9), name
    assert got.accuracy == want.accuracy


EXTRA = {
    "logits[::-1]": _first_example,
    'device="cuda"': _gpu_example,
    "per_row=True": _evaluate_example,
    "xf.evaluate_file(": _evaluate_file_example,
}


def extras_for(block):
    return [fn for key, fn in EXTRA.items() if key in block.src]


# ---------------------------------------------------------------------------- running
_RUNNER = """\
import json, runpy, sys
ns = runpy.run_path("block.py", run_name="__main__")
print("CLAIMS " + json.dumps({e: float(eval(e, ns)) for e in json.loads(sys.argv[1])}))
"""


def run_doctest(block):
    import doctest

    test = doctest.DocTestParser().get_doctest(block.src, {}, repr(block), str(README),
                                               block.line - 1)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test, out=out.write)
    assert runner.failures == 0, out.getvalue()
    assert runner.tries == len(test.examples) > 0


def run_here(block):
    ns = {"__name__": "__readme__"}
    exec(compile(block.src, f"{README}:{block.line} (block {block.index})", "exec"), ns)
    return ns


def run_script(block, folder):
    """The block as a script (``__name__ == "__main__"``), as ``python block.py`` runs it,
    in its own process; returns the values of its claims."""
    (folder / "block.py").write_text(block.src, encoding="utf-8")
    exprs = [e for e, _, _ in claims(block.src)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(exprs)], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{block} failed as a script:\n{proc.stderr[-4000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("CLAIMS ")][-1]
    return json.loads(line[len("CLAIMS "):])


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block, tmp_path, monkeypatch):
    missing = missing_packages(block)
    if missing:
        pytest.skip(f"{block} needs {', '.join(missing)}, which is not installed")
    if block.gpu:
        reason = no_gpu_reason()
        if reason:
            pytest.skip(f"{block} runs on a CUDA GPU: {reason}")
    monkeypatch.chdir(tmp_path)
    if block.doctest:
        run_doctest(block)
        return
    if block.script:
        values = run_script(block, tmp_path)
        for expr, op, quoted in claims(block.src):
            check_claim(expr, op, quoted, values[expr])
        return
    ns = run_here(block)
    for expr, op, quoted in claims(block.src):
        check_claim(expr, op, quoted, float(eval(expr, ns)))
    for fn in extras_for(block):
        fn(ns)


# ---------------------------------------------------------------------------- the checker
def test_every_block_shows_something_checked():
    assert BLOCKS, "README.md has no ```python block"
    for block in BLOCKS:
        if block.doctest:
            import doctest

            examples = doctest.DocTestParser().get_examples(block.src)
            assert any(ex.want for ex in examples), f"{block}: no output to compare"
        else:
            assert claims(block.src) or extras_for(block), (
                f"{block} shows nothing that tests/test_readme.py checks: quote its result "
                f"in a comment ('# EXPR ≈ NUMBER') or add an entry to EXTRA")


def test_every_extra_check_finds_one_block():
    for key in EXTRA:
        hits = [b.index for b in BLOCKS if key in b.src]
        assert len(hits) == 1, f"EXTRA key {key!r} occurs in blocks {hits}, not in one"


def test_block_kinds():
    """The README's blocks are sorted as they need: the GPU one, the script (Dask), the
    doctest and the plain ones each found (a block sorted wrongly fails, or is skipped)."""
    kinds = [b.kind for b in BLOCKS]
    assert kinds.count("gpu") >= 1 and kinds.count("script") >= 1
    assert kinds.count("doctest") >= 1 and kinds.count("here") >= 3


def test_claims_are_read_and_checked():
    src = ("x = 1  # mean: x ≈ 10.851, y[1] == 3\n"
           "s = '# not ≈ 1'  # float(loss) ≈ 8.12 (nats)\n")
    assert claims(src) == [("x", "≈", "10.851"), ("y[1]", "==", "3"),
                           ("float(loss)", "≈", "8.12")]
    check_claim("x", "≈", "10.851", 10.850985)
    check_claim("ppl", "≈", "51585", 51584.92)
    with pytest.raises(AssertionError):
        check_claim("x", "≈", "10.851", 10.8525)
    with pytest.raises(AssertionError):
        check_claim("kl", "≈", "0.2499", 0.2501)
    with pytest.raises(AssertionError):
        check_claim("n", "==", "9900", 9901)
    with pytest.raises(AssertionError, match="unreadable claim"):
        claims("x = 1  # about ≈ that\n")
    b = python_blocks("text\n```python\n>>> 1 + 1\n2\n```\n```python\nimport numpy\n"
                      "if __name__ == \"__main__\":\n    pass\n```\n")
    assert [x.kind for x in b] == ["doctest", "script"] and b[1].line == 7
    assert imported_modules(b[1].src) == {"numpy"}
