"""What the first calls compile and load: each variant only its own code, the threaded
loop apart from the row code, SciPy left alone, and warmup()'s share-out.

Times are measured by benchmarks/startup.py, never asserted here; these tests pin the
structure those times come from.  Each case runs in a fresh process.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from xent_fast import _ops, _warmup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, extra_env=None):
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout.strip().splitlines()


def test_the_package_attributes_load_on_first_use():
    out = _run("""
        import sys
        import xent_fast as xf
        print(sorted(m for m in ("xent_fast._stream", "xent_fast._evaluate",
                                 "xent_fast._warmup") if m in sys.modules))
        print(xf.evaluate_file.__module__, xf.EvalState.__name__, callable(xf.warmup))
        print(set(xf.__all__) <= set(dir(xf)))
        try:
            xf.no_such_function
        except AttributeError as e:
            print(e)
    """)
    assert out[0] == "[]"
    assert out[1] == "xent_fast._stream EvalState True"
    assert out[2] == "True"
    assert out[3] == "module 'xent_fast' has no attribute 'no_such_function'"


def _compiled_functions():
    """A list that the qualified names of the functions Numba compiles from now on are
    appended to (for the probes run by _run)."""
    from numba.core import event

    names = []

    class Listen(event.Listener):
        def on_start(self, ev):
            names.append(ev.data["dispatcher"].py_func.__qualname__)

        def on_end(self, ev):
            pass

    event.register("numba:compile", Listen())
    return names


_CACHE_PROBE = """
    import sys, numpy as np, xent_fast as xf
    from xent_fast import reference
    p = np.random.default_rng(0).dirichlet(np.ones(300), size=4).astype(np.float32)
    ok = [np.allclose(xf.entropy(p, backend=b), reference.entropy(p), rtol=1e-5)
          for b in ("cpu", "parallel")]
    print("numba.np.arraymath" in sys.modules, "scipy.linalg" in sys.modules, all(ok))
    q = p.astype(np.float64)  # a kernel not in the cache: compiled after the loads
    print(np.allclose(xf.entropy(q, backend="cpu"), reference.entropy(q), rtol=1e-12))
    import numba.np.arraymath as am
    print(am._HAVE_BLAS)
"""


def test_cached_kernels_load_without_readying_the_compiler(tmp_path):
    """A process whose kernels are all in the cache loads them without Numba's compiler
    registries (most of a warm start); one that compiles keeps SciPy out of it."""
    pytest.importorskip("scipy")
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    cold = _run(_CACHE_PROBE, env)  # compiles: the registries load, SciPy does not
    assert cold == ["True False True", "True", "True"]
    warm = _run(_CACHE_PROBE, env)  # loads the float32 kernels; compiles nothing for them
    # SciPy is installed, so Numba's BLAS flag says so, without SciPy imported before
    assert warm == ["False False True", "True", "True"]


def test_every_operation_loads_from_the_cache_in_a_new_process(tmp_path):
    """Each public operation (loss and gradient) compiled in one process is loaded, not
    compiled again, in the next: the elementwise drivers, whose closures hold a jitted
    row function, were keyed by a pickle that changed with every process."""
    probe = """
        import numpy as np, xent_fast as xf
        from test_startup import _compiled_functions
        from xent_fast import _ops
        compiled = _compiled_functions()
        for op in _ops.OPS:
            d = op.make_inputs(3, 40)
            op.call(xf, d, backend="cpu")
            if op.grad:
                op.call(xf, d, backend="cpu", return_grad=True)
        print(len(compiled) > 0, sorted({n for n in compiled if "_serial_" in n}))
    """
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    cold = _run(probe, env)
    assert cold[-1].startswith("True [") and "bce_logits" in cold[-1]
    warm = _run(probe, env)
    assert warm[-1] == "False []"


def test_cache_entries_keep_only_the_names_of_the_linking_module(tmp_path):
    """A cached driver carries its machine code and, where Numba keeps the function's
    LLVM module for inlining elsewhere, only empty functions of the names it defines
    (what loading reads it for); a new process loads and runs it, serially and on
    threads.  A payload of another shape is cached unchanged."""
    from xent_fast._cpu.backend import _symbols_only

    assert _symbols_only(("x", 1)) == ("x", 1)
    lib = ("name", "bitcode", b"...")
    assert _symbols_only((lib, 2, 3)) == (lib, 2, 3)
    out = _run("""
        import numpy as np, xent_fast as xf, llvmlite.binding as ll
        from xent_fast._cpu import backend
        x = np.linspace(-3, 3, 4096 * 40).reshape(4096, 40)
        xf.logsumexp(x[:2], backend="cpu")
        xf.logsumexp(x, backend="parallel")
        for (name, par, sig), disp in sorted(backend._dispatchers.items(), key=str):
            cres = disp.overloads[sig]
            lib = disp._cache._impl.reduce(cres)[0]
            mod = ll.parse_bitcode(lib[2][1])
            full = cres.library._get_module_for_linking()
            want = sorted(f.name for f in full.functions if not f.is_declaration)
            got = sorted(f.name for f in mod.functions if not f.is_declaration)
            blocks = max(len(list(f.blocks)) for f in mod.functions)
            print(lib[1], got == want and len(want) > 0, blocks)
        print(float(xf.logsumexp(x, backend="parallel")[7]), float(xf.logsumexp(x[:2])[1]))
    """, {"NUMBA_CACHE_DIR": str(tmp_path)})
    assert out[:-1] == ["object True 1", "object True 1"]
    again = _run("""
        import numpy as np, xent_fast as xf
        from xent_fast._cpu import backend
        x = np.linspace(-3, 3, 4096 * 40).reshape(4096, 40)
        print(float(xf.logsumexp(x, backend="parallel")[7]), float(xf.logsumexp(x[:2])[1]))
        print(sum(len(d.overloads) for d in backend._dispatchers.values()),
              all(d._cache_hits for d in backend._dispatchers.values()))
    """, {"NUMBA_CACHE_DIR": str(tmp_path)})
    assert again[0] == out[-1]  # loaded, not compiled, and the same numbers
    assert again[1] == "2 True"


def test_a_forward_call_compiles_no_gradient_and_threads_reuse_the_row_code():
    out = _run("""
        import numpy as np, xent_fast as xf
        from xent_fast._cpu import backend
        x = np.linspace(-1, 1, 6 * 40, dtype=np.float32).reshape(6, 40)
        t = np.arange(6) % 40
        def names():
            return sorted({(k[0], k[1]) for k in backend._dispatchers if k[0]})
        xf.softmax_cross_entropy(x, t, backend="cpu")
        print(names())
        xf.softmax_cross_entropy(x, t, backend="parallel")
        print(names())
        xf.softmax_cross_entropy(x, t, backend="parallel", return_grad=True)
        print(names())
    """)
    # (a few targets are checked by NumPy: no compiled scan for them)
    assert out[0] == "[('ce_index', False)]"
    # the threaded call adds only its loop: the serial driver it calls is the one above
    assert out[1] == "[('ce_index', False), ('ce_index', True)]"
    # the gradient is a driver of its own, and shares the loop (the same argument types)
    assert out[2] == "[('ce_index', False), ('ce_index', True), ('ce_index_grad', False)]"


def test_one_line_helpers_are_emitted_inline_not_compiled_apart(tmp_path):
    """Work rows, row views, casts and ordered keys are intrinsics: a compile of a driver
    runs Numba's pipeline for none of them (nor for np.empty's overload chain), nor for
    the same-pass gradient variant's row accessors."""
    out = _run("""
        import numpy as np, xent_fast as xf
        from test_startup import _compiled_functions
        names = _compiled_functions()
        for dt in (np.float32, np.float64, np.float16):
            x = np.linspace(-1, 1, 6 * 40).astype(dt).reshape(6, 40)
            xf.softmax_cross_entropy(x, np.arange(6) % 40, return_grad=True)
        xf.softmax_cross_entropy(x.astype(np.float32), np.arange(6) % 40)
        print(sorted(set(names)))
    """, {"NUMBA_CACHE_DIR": str(tmp_path)})
    compiled = out[-1]
    assert "ce_index_grad_serial" in compiled and "ce_index_serial" in compiled
    for helper in ("cast_like", "float_key", "key_float", "lanes_of", "work_row", "unit_row",
                   "load_row", "grad_row", "store_grad_row", "ol_np_empty", "_call_allocator",
                   "ol_min", "ol_max"):
        assert helper not in compiled, (helper, compiled)


def test_only_a_gradient_large_enough_to_stream_compiles_the_streaming_path(tmp_path):
    """A gradient below drivers._STREAM_BYTES runs the variant without the streaming
    path (nor the one-pass forward it follows); a larger one the variant with it, and
    both give the same numbers (to rounding: the streamed rows' exps are computed once
    more, from the one-pass max)."""
    out = _run("""
        import numpy as np, xent_fast as xf
        from test_startup import _compiled_functions
        from xent_fast._cpu import backend, drivers
        compiled = _compiled_functions()
        c = 1000
        n = drivers._STREAM_BYTES // (4 * c) + 1
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, c), dtype=np.float32)
        t = rng.integers(0, c, n)
        l1, g1 = xf.softmax_cross_entropy(x[:8], t[:8], return_grad=True, backend="cpu")
        print(sorted({k[0] for k in backend._dispatchers}),
              any("stream" in f or "sumexp" in f for f in compiled))
        l2, g2 = xf.softmax_cross_entropy(x, t, return_grad=True, reduction="sum",
                                          backend="cpu")
        print(sorted({k[0] for k in backend._dispatchers}),
              any("_ce_grad_stream" in f for f in compiled))
        l3, g3 = xf.softmax_cross_entropy(x[:8], t[:8], return_grad=True, reduction="sum",
                                          backend="cpu")
        l4 = xf.softmax_cross_entropy(x, t, reduction="sum", backend="cpu")
        print(np.allclose(g2[:8], g3, rtol=1e-5, atol=1e-9),
              abs(float(l2) - float(l4)) <= 1e-6 * abs(float(l2)))
    """, {"NUMBA_CACHE_DIR": str(tmp_path)})
    assert out[0] == "['ce_index_grad'] False"
    assert out[1] == "['ce_index_grad', 'ce_index_grad_stream'] True"
    assert out[2] == "True True"


def test_a_compile_leaves_the_garbage_collector_as_it_found_it():
    out = _run("""
        import gc
        import numpy as np, xent_fast as xf
        x = np.linspace(-1, 1, 6 * 40, dtype=np.float32).reshape(6, 40)
        print(gc.isenabled())
        xf.logsumexp(x)
        print(gc.isenabled())
        gc.disable()
        xf.softmax(x)
        print(gc.isenabled())
    """)
    assert out == ["True", "True", "False"]


def test_inlined_ir_copies_share_one_scope_copy_each():
    """Numba's inliner copies a function's IR block by block; with the copy module it
    uses standing in (see _cpu.jit._SharedScopeCopy) the blocks of one copy share one
    copy of the scope, each copy has its own, and the copied blocks are the same."""
    import copy

    from numba.core import inline_closurecall, ir
    from numba.core.compiler import run_frontend

    from xent_fast._cpu import jit

    jit.load_numba_math()
    shim = inline_closurecall.copy
    assert isinstance(shim, jit._SharedScopeCopy)

    def f(a, b):
        s = 0.0
        for i in range(a):
            if i % 2:
                s += b
            else:
                s -= i
        return s

    func_ir = run_frontend(f)
    assert len(func_ir.blocks) > 3

    def copy_ir(the_ir):  # shaped as the inliner's own
        kernel_copy = the_ir.copy()
        kernel_copy.blocks = {}
        for label, block in the_ir.blocks.items():
            kernel_copy.blocks[label] = shim.deepcopy(block)
        return kernel_copy

    one, two = copy_ir(func_ir), copy_ir(func_ir)
    scopes = {id(b.scope) for b in one.blocks.values()}
    assert len(scopes) == 1
    assert scopes.isdisjoint({id(b.scope) for b in two.blocks.values()})
    original = {id(b.scope) for b in func_ir.blocks.values()}
    assert scopes.isdisjoint(original)
    for label, block in func_ir.blocks.items():
        plain = copy.deepcopy(block)
        text = [str(inst) for inst in block.body]
        assert [str(inst) for inst in one.blocks[label].body] == text
        assert [str(inst) for inst in plain.body] == text
        assert one.blocks[label].scope.localvars._con.keys() == block.scope.localvars._con.keys()
        for var in one.blocks[label].find_insts(ir.Assign):
            assert var.target.scope is one.blocks[label].scope
    # a mutation of one copy's scope reaches neither the original nor the other copy
    next(iter(one.blocks.values())).scope.redefine("fresh", func_ir.loc)
    assert "fresh" not in next(iter(func_ir.blocks.values())).scope.localvars._con
    assert "fresh" not in next(iter(two.blocks.values())).scope.localvars._con


def test_a_threaded_call_runs_every_block_like_a_serial_one():
    out = _run("""
        import numpy as np, xent_fast as xf
        from xent_fast._cpu import backend
        rng = np.random.default_rng(0)
        x = rng.standard_normal((37, 50)).astype(np.float32)
        out = {}
        for nb in (1, 3, 37):
            o = np.full(37, np.nan, np.float32)
            backend.run("logsumexp", True, x, 0, o, nb)
            out[nb] = o
        s = np.full(37, np.nan, np.float32)
        backend.run("logsumexp", False, x, 0, s, 1)
        print(all(np.array_equal(out[nb], s) for nb in out), bool(np.isnan(s).any()))
    """)
    assert out == ["True False"]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("dtypes", [["float32"], ["float32", "float64"]])
def test_warmup_shares_cover_every_operation_once_per_dtype(count, dtypes):
    shares = _warmup._shares(dtypes, count)
    assert 1 <= len(shares) <= count
    done = [(k, d) for kinds, dts in shares for d in dts for k in kinds]
    assert sorted(done) == sorted((op.kind, d) for op in _ops.OPS for d in dtypes)
    for kinds, dts in shares:  # operations that run one driver stay in one process
        for k in kinds:
            partner = _warmup._SHARES_DRIVER.get(k)
            if partner is not None:
                assert partner in kinds


def test_warmup_of_named_functions_covers_their_kernels_only():
    assert _warmup._kinds(["softmax_cross_entropy"]) == ["ce", "ce_probs"]
    assert _warmup._kinds("evaluate") == ["evaluate"]
    assert _warmup._kinds(None) == [op.kind for op in _ops.OPS]
    with pytest.raises(ValueError, match="functions: .*'softmax_crossentropy'"):
        _warmup._kinds(["softmax_crossentropy"])
    kinds = _warmup._kinds(["softmax_cross_entropy", "evaluate"])
    for count in (1, 2, 3):
        shares = _warmup._shares(["float32"], count, kinds)
        assert sorted(k for ks, _ in shares for k in ks) == sorted(kinds)
    out = _run("""
        import numpy as np, xent_fast as xf
        from xent_fast._cpu import backend
        made = xf.warmup(["float32"], ["cpu"], 1, functions=["binary_cross_entropy"],
                         grad=False)
        names = sorted({k[0] for k in backend._entry_points})
        p = np.full((3, 70), 0.5, np.float32)
        xf.binary_cross_entropy(p, p, backend="cpu")
        again = xf.warmup(["float32"], ["cpu"], 1, functions=["binary_cross_entropy"])
        print(made, names, backend.kernels_ready() == made, again)
    """)
    assert out == ["1 ['bce'] True 0"]
    # a loss's warmup covers the kernels of large calls too: the compiled target scan
    # and the gradient that streams, which a small first call does not build
    out = _run("""
        import numpy as np, xent_fast as xf
        from xent_fast._cpu import backend
        xf.warmup(["float32"], ["cpu"], 1, functions=["softmax_cross_entropy"])
        names = sorted({k[0] for k in backend._entry_points})
        ready = backend.kernels_ready()
        c = 1000
        n = (1 << 25) // (4 * c) + 1
        x = np.zeros((n, c), np.float32)
        xf.softmax_cross_entropy(x, np.arange(n) % c, return_grad=True, backend="cpu")
        print(names, backend.kernels_ready() == ready)
    """)
    assert out == ["['ce_index', 'ce_index_grad', 'ce_index_grad_stream', 'ce_prob', "
                   "'ce_prob_grad', 'targets'] True"]


def test_warmup_builds_the_few_classes_kernels_of_the_counts_named():
    assert _warmup._small_kinds([10, 3, 10]) == ["ce_small:10", "ce_small:3"]
    assert _warmup._small_kinds(np.int64(16)) == ["ce_small:16"]
    for bad in (1, 17, 2.5, True, "10"):
        with pytest.raises(ValueError, match="classes: class counts from 2 to 16"):
            _warmup._small_kinds([bad])
    with pytest.raises(TypeError, match="dtypes: 'float33'"):
        _warmup.warmup(["float33"])
    kinds = _warmup._kinds(["softmax_cross_entropy"]) + ["ce_small:10", "ce_small:3"]
    for count in (1, 2, 3):
        shares = _warmup._shares(["float32"], count, kinds)
        assert sorted(k for ks, _ in shares for k in ks) == sorted(kinds)
    out = _run("""
        import numpy as np, xent_fast as xf
        from xent_fast._cpu import backend
        xf.warmup(["float64"], ["cpu"], 1, functions=["evaluate"], grad=False, classes=[5])
        print(sorted({k[0] for k in backend._entry_points}))
        made = xf.warmup(["float64"], ["cpu"], 1, functions=["softmax_cross_entropy"],
                         grad=False, classes=[5])
        names = sorted({k[0] for k in backend._entry_points})
        ready = backend.kernels_ready()
        x = np.zeros((3, 5))
        xf.softmax_cross_entropy(x, np.arange(3), backend="cpu")
        xf.softmax_cross_entropy(x, np.arange(3), weight=np.ones(5), backend="cpu")
        print(names, backend.kernels_ready() == ready)
    """)
    assert out[0] == "['eval_stats', 'targets']"  # classes= is for softmax_cross_entropy only
    assert out[1] == ("['ce_index', 'ce_prob', 'ce_small5_00', 'ce_small5_10', 'eval_stats', "
                      "'targets'] True")


def test_an_entry_that_fails_the_light_load_goes_to_numbas_own_lookup():
    """A failure of the runtime-only load (say a Numba release that needs more to link
    cached code) is retried by Numba's lookup, which readies the compiler first."""
    from types import SimpleNamespace
    import contextlib

    from numba.core.registry import cpu_target

    from xent_fast._cpu import backend

    calls = []

    class Cache:
        def _guard_against_spurious_io_errors(self):
            return contextlib.nullcontext()

        def _load_overload(self, sig, ctx):
            calls.append("light")
            raise RuntimeError("symbol not found")

        def load_overload(self, sig, ctx):
            calls.append("numba")
            return "loaded"

    disp = backend._light_cache_load(SimpleNamespace(_cache=Cache()))
    assert disp._cache.load_overload((), cpu_target.target_context) == "loaded"
    assert calls == ["light", "numba"]
