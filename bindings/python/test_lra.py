"""Tests of the ctypes binding; run with Debian's python (it has torch):

    LRA_LIBRARY=target/release/liblra.so /usr/bin/python3 -m unittest bindings/python/test_lra.py -v

The torch tests skip (with the reason printed by unittest) where torch is
missing; the stage script only runs this file with a python that has it.
"""

import math
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lra  # noqa: E402

try:
    import torch
except ImportError:  # pragma: no cover - the stage script needs torch
    torch = None

try:
    import numpy as np
except ImportError:  # pragma: no cover - Debian's python3-torch depends on numpy
    np = None


def f32_buffer(values):
    import ctypes

    return (ctypes.c_float * len(values))(*values)


class RawHandleTests(unittest.TestCase):
    def test_a_set_lra_library_that_does_not_load_is_an_error(self):
        # It used to fall back, in a checkout, to target/release silently:
        # the caller then ran another library than the one it named.
        import subprocess

        here = os.path.dirname(os.path.abspath(__file__))
        code = "import sys; sys.path.insert(0, sys.argv[1]); import lra; lra.load_library()"
        env = dict(os.environ, LRA_LIBRARY=os.path.join(here, "no-such-liblra.so"))
        run = subprocess.run([sys.executable, "-c", code, here], env=env,
                             capture_output=True, text=True)
        self.assertNotEqual(run.returncode, 0)
        self.assertIn("LRA_LIBRARY does not load", run.stderr)
        self.assertIn("no-such-liblra.so (missing)", run.stderr)

    def test_version_and_defaults(self):
        # lra.__version__ is the package's version (pyproject.toml reads it):
        # it must be Cargo.toml's and the loaded library's.
        cargo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "Cargo.toml")
        with open(cargo) as f:
            cargo_version = next(line.split('"')[1] for line in f if line.startswith("version"))
        self.assertEqual(lra.__version__, cargo_version)
        self.assertEqual(lra.version(), tuple(int(x) for x in cargo_version.split(".")))
        cfg = lra.Optimizer.default_config("adam")
        self.assertEqual(cfg.struct_size, __import__("ctypes").sizeof(lra.Config))
        self.assertEqual(cfg.beta1, 0.5)
        self.assertTrue(math.isnan(cfg.f_star))

    def test_invalid_config_raises_with_message(self):
        with self.assertRaises(lra.LraError) as ctx:
            lra.Optimizer("sgd", lr=-1.0)
        self.assertEqual(ctx.exception.status, 3)  # LRA_INVALID_CONFIG
        self.assertIn("lr", ctx.exception.message)

    def test_unknown_field_is_a_type_error(self):
        with self.assertRaises(TypeError):
            lra.Optimizer("sgd", learning_rate=1e-3)

    def test_sgd_step_on_raw_buffers(self):
        import ctypes

        param = f32_buffer([1.0, -2.0, 3.0])
        grad = f32_buffer([0.5, 0.5, -1.0])
        with lra.Optimizer("sgd", lr=0.1, num_threads=1) as opt:
            t = (ctypes.addressof(param), ctypes.addressof(grad), 3, lra.DTYPE_F32)
            opt.step([t], loss=2.0)
            self.assertAlmostEqual(param[0], 1.0 - 0.1 * 0.5, places=6)
            self.assertAlmostEqual(param[2], 3.0 + 0.1, places=6)
            # phi = g . v = lr * |g|^2 = 0.1 * 1.5
            self.assertAlmostEqual(opt.last_phi, 0.15, places=6)
            # a decrease far above the predicted phi/2 raises lr by 1.2
            info = opt.report_reeval(2.0 - 0.15)
            self.assertEqual(info.decision_name, "raised")
            self.assertAlmostEqual(opt.lr, 0.12)
            # a second report for the same step is out of order
            with self.assertRaises(lra.LraError) as ctx:
                opt.report_reeval(1.0)
            self.assertEqual(ctx.exception.status, lra.CALL_ORDER)
            self.assertIn("pending", ctx.exception.message)
            self.assertEqual(opt.counters.steps, 1)
            self.assertEqual(opt.counters.raised, 1)
        with self.assertRaises(lra.LraError):
            opt.lr  # closed

    def test_checkpoint_round_trip(self):
        import ctypes

        param = f32_buffer([1.0, 2.0])
        grad = f32_buffer([1.0, -1.0])
        t = [(ctypes.addressof(param), ctypes.addressof(grad), 2, lra.DTYPE_F32)]
        a = lra.Optimizer("adam", lr=0.01, num_threads=1)
        a.step(t, 1.0)
        a.report_reeval(0.5)
        blob = a.save_state()
        b = lra.Optimizer("adam", lr=0.01, num_threads=1)
        b.step(t, 1.0)  # fixes the layout
        b.report_reeval(1.0)
        b.load_state(blob)
        self.assertEqual(b.lr, a.lr)
        self.assertEqual(b.save_state(), blob)
        with self.assertRaises(lra.LraError):
            b.load_state(blob[:-3])

    def test_reduction_callback_is_called(self):
        import ctypes

        calls = []

        def reduce(values):
            calls.append(list(values))
            return values  # a single rank: the sum is the value

        param = f32_buffer([1.0])
        grad = f32_buffer([1.0])
        opt = lra.Optimizer("sgd", lr=0.1, sharding="sharded", num_threads=1)
        opt.set_reduction(reduce)
        opt.step([(ctypes.addressof(param), ctypes.addressof(grad), 1, lra.DTYPE_F32)], 1.0)
        opt.report_reeval(0.9)
        self.assertTrue(calls, "the reduction was never called for a sharded handle")

    def test_empty_shard_still_steps_and_reduces(self):
        # A rank that owns no parameter still takes every step and joins
        # every collective (README, "Distributed training").
        sizes = []

        def reduce(values):
            sizes.append(len(values))
            return values

        with lra.Optimizer("sgd", sharding="sharded", num_threads=1) as opt:
            opt.set_reduction(reduce)
            opt.step([], 1.0)
            self.assertEqual(opt.last_phi, 0.0)
            info = opt.report_reeval(0.5)
            self.assertEqual((info.decision_name, info.skip_reason_name), ("skipped", "nonpositive_phi"))
            # pre-write [non-finite, found-inf, 0] (guard on), then this rank's φ
            self.assertEqual(sizes, [3, 1])


@unittest.skipIf(np is None, "numpy is not importable by this python")
class NumpyTensorTests(unittest.TestCase):
    def test_least_squares_fit_trained_through_numpy_tensors(self):
        rng = np.random.default_rng(0)
        n, d, k = 256, 8, 3
        a = rng.standard_normal((n, d)).astype(np.float32)
        y = a @ rng.standard_normal((d, k)).astype(np.float32) + rng.standard_normal(k).astype(np.float32)
        w = np.zeros((d, k), np.float32, order="F")  # any dense layout: Fortran order here
        gw = np.zeros_like(w)  # zeros_like keeps the Fortran order
        b, gb = np.zeros(k, np.float32), np.zeros(k, np.float32)
        empty, gempty = np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32)

        def loss(with_grads=False):
            r = a @ w + b - y
            if with_grads:  # in place: the Tensors point into gw and gb
                np.matmul(a.T, r, out=gw)
                gw[...] /= n
                np.sum(r, axis=0, out=gb)
                gb[...] /= n
            return 0.5 * float(np.sum(r.astype(np.float64) ** 2)) / n

        # Made once: the gradients are rewritten in place at every step.
        tensors = [lra.numpy_tensor(w, gw), lra.numpy_tensor(b, gb), lra.numpy_tensor(empty, gempty)]
        self.assertEqual([t.numel for t in tensors], [d * k, k, 0])
        with lra.Optimizer("sgd", lr=1e-4, num_threads=1) as opt:
            first = loss()
            decisions, lrs = set(), []
            # 60 steps: η climbs ×1.2 a step to about 1 (the stable range
            # here) and the fit converges. (Run on past float32's resolution
            # of the loss, ρ turns to noise and η is lowered step after step.)
            for _ in range(60):
                opt.step(tensors, loss(with_grads=True))
                decisions.add(opt.report_reeval(loss()).decision_name)
                lrs.append(opt.lr)
            last = loss()
            print(f"\n  numpy least squares, sgd lr0=1e-4: loss {first:.3g} -> {last:.3g}, "
                  f"lr max {max(lrs):.3g}, last {lrs[-1]:.3g}")
            self.assertLess(last, 1e-3 * first)
            self.assertGreater(max(lrs), 1e-1, "the adaptation never raised the tiny initial lr")
            self.assertGreater(lrs[-1], 1e-2)
            self.assertIn("raised", decisions)
            self.assertEqual(opt.counters.steps, 60)

    def assert_refused(self, exc, pattern, param, grad, watched=()):
        """numpy_tensor(param, grad) raises ``exc`` matching ``pattern``; the
        handle and the memory of ``param`` and of the ``watched`` arrays are
        unchanged, and a valid first step still works afterwards."""
        watched = [x for x in (param, *watched) if isinstance(x, np.ndarray)]
        before = [x.tobytes() for x in watched]
        with lra.Optimizer("sgd", lr=0.1, num_threads=1) as opt:
            counters = opt.counters.as_dict()
            with self.assertRaisesRegex(exc, pattern):
                opt.step([lra.numpy_tensor(param, grad)], 1.0)
            self.assertEqual(opt.lr, 0.1)
            self.assertEqual(opt.counters.as_dict(), counters)
            self.assertEqual([x.tobytes() for x in watched], before)
            p, g = np.ones(3, np.float32), np.full(3, 2.0, np.float32)
            opt.step([lra.numpy_tensor(p, g)], 1.0)  # the refusal fixed no layout
            np.testing.assert_allclose(p, 0.8, rtol=1e-6)
            self.assertEqual(opt.counters.steps, 1)

    def test_read_only_param_is_refused(self):
        p = np.ones(4, np.float32)
        p.flags.writeable = False
        self.assert_refused(ValueError, "param is read-only", p, np.ones(4, np.float32))

    def test_unsupported_dtypes_are_type_errors_that_mention_bfloat16(self):
        f64 = np.ones(4)
        self.assert_refused(TypeError, r"param has dtype float64; .*numpy has no bfloat16", f64, np.ones(4))
        self.assert_refused(TypeError, "grad has dtype float64", np.ones(4, np.float32), f64)
        big_endian = np.ones(4, ">f4" if sys.byteorder == "little" else "<f4")
        self.assert_refused(TypeError, "non-native byte order", big_endian, big_endian.copy())
        self.assert_refused(TypeError, "param has dtype int32", np.ones(4, np.int32), np.ones(4, np.int32))

    def test_mixed_dtypes_are_refused(self):
        self.assert_refused(ValueError, "grad has dtype float16, param float32",
                            np.ones(4, np.float32), np.ones(4, np.float16))

    def test_shape_mismatch_is_refused_even_with_the_same_size(self):
        self.assert_refused(ValueError, r"grad has shape \(3, 2\), param \(2, 3\)",
                            np.ones((2, 3), np.float32), np.ones((3, 2), np.float32))

    def test_views_that_do_not_cover_their_memory_densely_are_refused(self):
        base = np.arange(8, dtype=np.float32)
        for name, view in (("a[::2]", base[::2]), ("a[::-1]", base[::-1][:4]),
                           ("column", base.reshape(4, 2)[:, 0])):
            with self.subTest(view=name):
                self.assert_refused(ValueError, "does not cover its memory densely", view,
                                    np.ones(view.shape, np.float32), watched=[base])

    def test_overlapping_param_and_grad_are_refused(self):
        buf = np.arange(6, dtype=np.float32)
        self.assert_refused(ValueError, "share memory", buf[:4], buf[2:], watched=[buf])
        self.assert_refused(ValueError, "share memory", buf, buf)

    def test_misaligned_arrays_are_refused(self):
        odd = np.frombuffer(bytearray(4 * 4 + 1), np.float32, count=4, offset=1)
        self.assertTrue(odd.flags.writeable)
        self.assert_refused(ValueError, "param is not aligned", odd, np.ones(4, np.float32))
        self.assert_refused(ValueError, "grad is not aligned", np.ones(4, np.float32), odd)

    def test_non_arrays_and_masked_arrays_are_type_errors(self):
        self.assert_refused(TypeError, "param must be a numpy.ndarray, not list", [1.0, 2.0],
                            np.ones(2, np.float32))
        self.assert_refused(TypeError, "grad must be a numpy.ndarray, not memoryview",
                            np.ones(2, np.float32), memoryview(np.ones(2, np.float32)))
        masked = np.ma.masked_array(np.ones(2, np.float32), mask=[True, False])
        self.assert_refused(TypeError, "param is a masked array", masked, np.ones(2, np.float32))

    def test_grad_in_another_memory_order_is_refused_and_the_suggested_copy_works(self):
        param = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
        grad = np.arange(6, dtype=np.float32).reshape(2, 3) / 10  # C order
        self.assert_refused(ValueError, "grad must be laid out like param", param, grad)
        g = np.empty_like(param)  # the message's recipe
        g[...] = grad
        expected = param - np.float32(0.5) * grad
        with lra.Optimizer("sgd", lr=0.5, num_threads=1) as opt:
            opt.step([lra.numpy_tensor(param, g)], 1.0)
        np.testing.assert_allclose(param, expected, rtol=1e-6)

    def test_permuted_dense_layouts_update_elementwise(self):
        base = np.arange(24, dtype=np.float32)
        param = base.reshape(2, 3, 4).transpose(1, 0, 2)  # dense, neither C nor F order
        self.assertFalse(param.flags.c_contiguous or param.flags.f_contiguous)
        grad = np.empty_like(param)
        grad[...] = np.linspace(-1, 1, 24, dtype=np.float32).reshape(param.shape)
        expected = param - np.float32(0.25) * grad
        with lra.Optimizer("sgd", lr=0.25, num_threads=1) as opt:
            opt.step([lra.numpy_tensor(param, grad)], 1.0)
        np.testing.assert_allclose(param, expected, rtol=1e-6)

    def test_float16_parameters(self):
        p, g = np.array([1.0, -2.0], np.float16), np.array([0.5, 0.5], np.float16)
        g.flags.writeable = False  # fine for a gradient: lra only reads it
        t = lra.numpy_tensor(p, g)
        self.assertEqual(t.dtype, lra.DTYPE_F16)
        with lra.Optimizer("sgd", lr=0.5, num_threads=1) as opt:
            opt.step([t], 1.0)
        self.assertEqual(p.tolist(), [0.75, -2.25])

    def test_ml_dtypes_bfloat16_parameters(self):
        try:
            import ml_dtypes
        except ImportError:
            self.skipTest("ml_dtypes is not importable (numpy has no bfloat16 of its own)")
        p = np.array([1.0, -2.0], ml_dtypes.bfloat16)
        g = np.array([0.5, 0.5], ml_dtypes.bfloat16)
        t = lra.numpy_tensor(p, g)
        self.assertEqual(t.dtype, lra.DTYPE_BF16)
        with lra.Optimizer("sgd", lr=0.5, num_threads=1) as opt:
            opt.step([t], 1.0)
        self.assertEqual(p.astype(np.float32).tolist(), [0.75, -2.25])

    def test_the_tensor_keeps_its_arrays_alive(self):
        import gc
        import weakref

        p, g = np.ones(4, np.float32), np.full(4, 2.0, np.float32)
        p_ref, g_ref = weakref.ref(p), weakref.ref(g)
        t = lra.numpy_tensor(p, g)
        del p, g
        gc.collect()
        self.assertIsNotNone(p_ref())
        self.assertIsNotNone(g_ref())
        with lra.Optimizer("sgd", lr=0.25, num_threads=1) as opt:
            opt.step([t], 1.0)
        self.assertEqual(p_ref().tolist(), [0.5] * 4)
        del t
        gc.collect()
        self.assertIsNone(p_ref())

    def test_a_generator_of_tensors_keeps_their_arrays_alive_through_the_step(self):
        # The Tensors of a generator (or map) are referenced by nothing but
        # step's own copy: their arrays were freed before lra read them. In
        # a fresh interpreter an 8 MiB array is mmapped, so a freed one is
        # unmapped and the read crashes instead of reading stale memory.
        import subprocess

        code = (
            "import sys; sys.path.insert(0, sys.argv[1])\n"
            "import numpy as np, lra\n"
            "n = 1 << 21\n"
            "w = np.zeros(n, np.float32)\n"
            "with lra.Optimizer('sgd', lr=1.0, num_threads=1) as opt:\n"
            "    g = np.full(n, 2.0, np.float32)\n"
            "    opt.step((lra.numpy_tensor(w, g.copy()) for _ in range(1)), 1.0)\n"
            "    opt.step(map(lra.numpy_tensor, [w], [np.ones(n, np.float32)]), 1.0)\n"
            "print(float(w.min()), float(w.max()))\n"
        )
        here = os.path.dirname(os.path.abspath(__file__))
        run = subprocess.run([sys.executable, "-c", code, here], capture_output=True, text=True)
        self.assertEqual(run.returncode, 0, run.stderr[-2000:])
        self.assertEqual(run.stdout.split(), ["-3.0", "-3.0"])

    def test_a_pair_of_arrays_in_step_points_at_numpy_tensor(self):
        p, g = np.ones(2, np.float32), np.ones(2, np.float32)
        with lra.Optimizer("sgd", num_threads=1) as opt:
            with self.assertRaisesRegex(ValueError, r"tensors\[0\] is not a .*lra\.numpy_tensor"):
                opt.step([(p, g)], 1.0)
            self.assertEqual(opt.counters.steps, 0)
        self.assertEqual(p.tolist(), [1.0, 1.0])

    def test_the_module_imports_without_numpy(self):
        import subprocess

        code = (
            "import sys; sys.modules['numpy'] = None; sys.path.insert(0, sys.argv[1]); import lra\n"
            "try:\n    lra.numpy_tensor(None, None)\nexcept ImportError:\n    print('no numpy')\n"
        )
        out = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))],
                             capture_output=True, text=True, check=True).stdout
        self.assertEqual(out.strip(), "no numpy")


@unittest.skipIf(torch is None, "torch is not importable by this python")
class TorchTests(unittest.TestCase):
    def make_problem(self):
        g = torch.Generator().manual_seed(0)
        n, d, classes = 512, 16, 4
        x = torch.randn(n, d, generator=g)
        w = torch.randn(d, classes, generator=g)
        y = (x @ w).argmax(dim=1)
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(d, 32), torch.nn.Tanh(), torch.nn.Linear(32, classes)
        )
        return x, y, model

    def train(self, optimizer, lr, epochs=30, batch=64):
        x, y, model = self.make_problem()
        loss_fn = torch.nn.CrossEntropyLoss()
        opt = lra.TorchOptimizer(model.parameters(), optimizer=optimizer, lr=lr, num_threads=1)
        with torch.no_grad():
            first = loss_fn(model(x), y).item()
        decisions = set()
        for _ in range(epochs):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), batch):
                idx = perm[i : i + batch]
                xb, yb = x[idx], y[idx]
                loss = loss_fn(model(xb), yb)
                model.zero_grad(set_to_none=True)  # autograd allocates fresh grads
                loss.backward()
                opt.step(loss)
                info = opt.reeval(lambda: loss_fn(model(xb), yb))
                decisions.add(info.decision_name)
        with torch.no_grad():
            logits = model(x)
            last = loss_fn(logits, y).item()
            acc = (logits.argmax(1) == y).float().mean().item()
        return first, last, acc, opt, decisions

    def test_adam_learns_from_tiny_lr(self):
        first, last, acc, opt, decisions = self.train("adam", 1e-4)
        print(f"\n  adam lr0=1e-4: loss {first:.3f} -> {last:.3f}, acc {acc:.3f}, lr {opt.lr:.3g}")
        self.assertLess(last, 0.5 * first)
        self.assertGreater(acc, 0.9)
        self.assertGreater(opt.lr, 1e-3, "the adaptation never raised the tiny initial lr")
        self.assertIn("raised", decisions)

    def test_sgd_learns_from_large_lr(self):
        first, last, acc, opt, decisions = self.train("sgd", 10.0)
        print(f"\n  sgd lr0=10: loss {first:.3f} -> {last:.3f}, acc {acc:.3f}, lr {opt.lr:.3g}")
        self.assertLess(last, 0.5 * first)
        self.assertGreater(acc, 0.85)
        self.assertIn("lowered", decisions)

    def test_missing_grad_and_bad_dtype_are_reported(self):
        p = torch.nn.Parameter(torch.zeros(3))
        opt = lra.TorchOptimizer([p], optimizer="sgd")
        with self.assertRaisesRegex(ValueError, "no gradient"):
            opt.step(1.0)
        with self.assertRaisesRegex(TypeError, "float32"):
            lra.TorchOptimizer([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])

    def test_found_inf_skips_the_step(self):
        p = torch.nn.Parameter(torch.ones(4))
        p.grad = torch.full((4,), 0.5)
        opt = lra.TorchOptimizer([p], optimizer="sgd", lr=0.1)
        opt.step(1.0, found_inf=torch.ones(1))
        self.assertTrue(torch.equal(p.detach(), torch.ones(4)))
        info = opt.report_reeval(1.0)
        self.assertEqual((info.decision_name, info.skip_reason_name), ("skipped", "found_inf"))
        opt.step(1.0, found_inf=torch.zeros(1))
        self.assertTrue(torch.allclose(p.detach(), torch.full((4,), 0.95)))
        with self.assertRaisesRegex(ValueError, "one float32 element"):
            opt.step(1.0, found_inf=torch.zeros(2))

    def test_state_dict_round_trip(self):
        p = torch.nn.Parameter(torch.ones(4))
        p.grad = torch.full((4,), 0.5)
        a = lra.TorchOptimizer([p], optimizer="momentum", lr=0.1)
        a.step(torch.tensor(1.0))
        a.report_reeval(0.9)
        b = lra.TorchOptimizer([p], optimizer="momentum", lr=0.1)
        b.step(1.0)
        b.load_state_dict(a.state_dict())
        self.assertEqual(b.lr, a.lr)
        self.assertEqual(b.lra.save_state(), a.lra.save_state())


class HandleLifetimeAndMessageTests(unittest.TestCase):
    def test_a_handle_cannot_be_copied_or_pickled(self):
        # A shallow copy shared the raw pointer: closing one freed the handle
        # under the other, which then steered whatever lra allocated there.
        import copy
        import pickle

        opt = lra.Optimizer("sgd")
        for dup in (copy.copy, copy.deepcopy, pickle.dumps):
            with self.subTest(dup=dup.__name__):
                with self.assertRaisesRegex(TypeError, "cannot be copied or pickled"):
                    dup(opt)
        self.assertAlmostEqual(opt.lr, 1e-3)
        opt.close()

    def test_lra_error_survives_pickling(self):
        # multiprocessing and concurrent.futures pickle a worker's exception;
        # one that does not unpickle breaks the pool instead of reaching the caller.
        import pickle

        with lra.Optimizer("sgd") as opt:
            with self.assertRaises(lra.LraError) as ctx:
                opt.report_reeval(1.0)
        err = pickle.loads(pickle.dumps(ctx.exception))
        self.assertEqual((err.status, err.message), (ctx.exception.status, ctx.exception.message))
        self.assertEqual(str(err), str(ctx.exception))
        self.assertTrue(str(err).startswith("lra status 4: "), str(err))
        self.assertIn("lra_report_reeval", str(err))

    def test_tensor_tuple_integers_the_c_fields_cannot_hold_are_refused(self):
        # ctypes stores integers modulo 2**bits: numel 2**64 + 3 became 3 and
        # dtype 2**32 became f32, and the step ran.
        import ctypes

        param, grad = f32_buffer([1.0, 1.0, 1.0]), f32_buffer([1.0, 1.0, 1.0])
        p, g = ctypes.addressof(param), ctypes.addressof(grad)
        with lra.Optimizer("sgd", lr=0.5, num_threads=1) as opt:
            for t, field in (((p, g, 2**64 + 3, 0), "numel"), ((p, g, 3, 2**32), "dtype"),
                             ((p + 2**64, g, 3, 0), "param")):
                with self.subTest(field=field):
                    with self.assertRaisesRegex(ValueError, rf"tensors\[0\]\.{field}"):
                        opt.step([t], 1.0)
            self.assertEqual(list(param), [1.0, 1.0, 1.0])
            self.assertEqual(opt.counters.steps, 0)
            opt.step([(ctypes.c_void_p(p), g, 3, lra.DTYPE_F32)], 1.0)  # ctypes pointers still pass
            self.assertEqual(list(param), [0.5, 0.5, 0.5])

    def test_a_wrong_type_for_a_double_field_names_the_field(self):
        with self.assertRaisesRegex(TypeError, "^lr: "):
            lra.Optimizer("sgd", lr="0.1")

    def test_refused_reentrant_call_reports_its_own_reason(self):
        # A call refused because another call runs on the handle leaves its
        # reason on the calling thread; the handle's message belongs to the
        # running call (here: empty).
        import ctypes

        seen = []
        param, grad = f32_buffer([1.0]), f32_buffer([1.0])
        with lra.Optimizer("sgd", sharding="sharded", num_threads=1) as opt:

            def reduce(values):
                try:
                    opt.lr
                except lra.LraError as e:
                    seen.append((e.status, e.message))
                return values

            opt.set_reduction(reduce)
            opt.step([(ctypes.addressof(param), ctypes.addressof(grad), 1, lra.DTYPE_F32)], 1.0)
        self.assertTrue(seen)
        self.assertEqual(seen[0][0], lra.CALL_ORDER)
        self.assertIn("in the middle of another call", seen[0][1])

    def test_close_works_after_module_globals_are_cleared(self):
        # At interpreter shutdown __del__ may run after lra's globals became None.
        from unittest import mock

        opt = lra.Optimizer("sgd")
        with mock.patch.object(lra, "_HANDLE", None):
            opt.close()
        with self.assertRaises(lra.LraError):
            opt.lr  # closed

    def test_close_from_inside_the_reducer_is_refused_and_the_handle_lives(self):
        # lra_destroy refuses (silently: it returns void) while a call runs
        # on the handle; close() must not then claim the handle is gone.
        refusals = []
        opt, t, param, grad = sharded_sgd()

        def reduce(values):
            try:
                opt.close()
            except lra.LraError as e:
                refusals.append((e.status, e.message))
            return values

        opt.set_reduction(reduce)
        opt.step(t, 1.0)
        self.assertEqual(refusals[0][0], lra.CALL_ORDER)
        self.assertIn("close()", refusals[0][1])
        self.assertAlmostEqual(param[0], 0.9, places=6)
        self.assertEqual(opt.counters.steps, 1)  # still open
        opt.close()
        opt.close()  # idempotent
        with self.assertRaisesRegex(lra.LraError, "closed"):
            opt.step(t, 1.0)

    def test_close_while_another_thread_is_in_a_call_is_refused(self):
        import threading

        inside, release, errors = threading.Event(), threading.Event(), []
        opt, t, param, grad = sharded_sgd()

        def reduce(values):
            inside.set()
            release.wait(10)
            return values

        def run():
            try:
                opt.step(t, 1.0)
            except BaseException as e:  # noqa: BLE001 -- reported below
                errors.append(e)

        opt.set_reduction(reduce)
        worker = threading.Thread(target=run)
        worker.start()
        try:
            self.assertTrue(inside.wait(10))
            with self.assertRaises(lra.LraError) as ctx:
                opt.close()
            self.assertEqual(ctx.exception.status, lra.CALL_ORDER)
        finally:
            release.set()
            worker.join()
        self.assertEqual(errors, [])
        self.assertAlmostEqual(param[0], 0.9, places=6)
        opt.close()
        with self.assertRaisesRegex(lra.LraError, "closed"):
            opt.lr


class ConfigValueTests(unittest.TestCase):
    """Keyword values are checked in Python: ctypes would wrap integers silently."""

    def test_unknown_names_are_value_errors_listing_the_valid_ones(self):
        cases = [
            (("adamx",), {}, "optimizer", "adamw"),
            (("sgd",), {"device": "gpu"}, "device", "cuda"),
            (("sgd",), {"reeval_schedule": "Every"}, "reeval_schedule", "geometric"),
            (("sgd",), {"sharding": "shard"}, "sharding", "replicated"),
        ]
        for args, kwargs, field, valid in cases:
            with self.subTest(field=field):
                with self.assertRaises(ValueError) as ctx:
                    lra.Optimizer(*args, **kwargs)
                self.assertIn(field, str(ctx.exception))
                self.assertIn(valid, str(ctx.exception))
        # Names as before: optimizer case-insensitive, the others exact.
        with lra.Optimizer("AdamW", device="cpu", reeval_schedule="every", sharding="replicated") as opt:
            self.assertEqual(opt.config.optimizer, lra.OPTIMIZERS["adamw"])
            self.assertEqual(opt.config.reeval_schedule, lra.REEVAL_SCHEDULES["every"])

    def test_integers_outside_the_c_type_are_value_errors(self):
        cases = [
            ("num_threads", -1, "4294967295"),
            ("num_threads", 2**32, "4294967295"),
            ("reeval_every", -5, "4294967295"),
            ("device_ordinal", 2**32, "2147483647"),
            ("device_ordinal", -(2**31) - 1, "-2147483648"),
            ("device", 2**32 + 1, "4294967295"),
        ]
        for field, value, bound in cases:
            with self.subTest(field=field, value=value):
                with self.assertRaises(ValueError) as ctx:
                    lra.Optimizer("sgd", **{field: value})
                self.assertIn(field, str(ctx.exception))
                self.assertIn(bound, str(ctx.exception))
        with self.assertRaisesRegex(ValueError, "optimizer"):
            lra.Optimizer(2**32 + lra.OPTIMIZERS["adam"])  # would wrap to Adam
        with self.assertRaisesRegex(ValueError, "optimizer"):
            lra.Optimizer.default_config(-1)
        # The edges of the range reach lra, which judges the value itself.
        self.assertEqual(lra.Optimizer.default_config(lra.OPTIMIZERS["adam"]).optimizer, 5)
        with self.assertRaises(lra.LraError):
            lra.Optimizer("sgd", num_threads=2**32 - 1, reeval_schedule=2**32 - 1)

    def test_non_integers_for_integer_fields_are_type_errors_naming_the_field(self):
        with self.assertRaisesRegex(TypeError, "num_threads"):
            lra.Optimizer("sgd", num_threads=1.5)
        with self.assertRaisesRegex(TypeError, "optimizer"):
            lra.Optimizer(None)

    def test_flag_fields_take_bools_and_a_failed_init_finalizes_quietly(self):
        from unittest import mock

        with lra.Optimizer("sgd", check_finite=False, loss_is_rank_local=False) as opt:
            self.assertEqual((opt.config.check_finite, opt.config.loss_is_rank_local), (0, 0))
        with lra.Optimizer("sgd", check_finite=True, num_threads=True) as opt:
            self.assertEqual((opt.config.check_finite, opt.config.num_threads), (1, 1))
        unraisable = []
        with mock.patch.object(sys, "unraisablehook", unraisable.append):
            with self.assertRaises(ValueError):
                lra.Optimizer("sgd", num_threads=-1)
            import gc

            gc.collect()
        self.assertEqual(unraisable, [])


def sharded_sgd(**config):
    """A sharded SGD handle (it reduces at every step), its tensors, and the
    parameter and gradient buffers (keep them: the tensors point into them)."""
    import ctypes

    param, grad = f32_buffer([1.0]), f32_buffer([1.0])
    opt = lra.Optimizer("sgd", lr=0.1, sharding="sharded", num_threads=1, **config)
    return opt, [(ctypes.addressof(param), ctypes.addressof(grad), 1, lra.DTYPE_F32)], param, grad


class ReductionFailureTests(unittest.TestCase):
    """What a reducer raises reaches the caller; lra is told it failed and changes nothing."""

    def setUp(self):
        import signal
        from unittest import mock

        # Python's own SIGINT handler, even under a shell that ignores SIGINT.
        self.addCleanup(signal.signal, signal.SIGINT, signal.getsignal(signal.SIGINT))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # ctypes reports an exception escaping a callback here, and goes on.
        self.unraisable = []
        patcher = mock.patch.object(sys, "unraisablehook", self.unraisable.append)
        patcher.start()
        self.addCleanup(patcher.stop)

    def assert_nothing_escaped_into_c(self):
        import signal

        self.assertEqual([u.exc_value for u in self.unraisable], [])
        self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)

    def test_reduction_failed_is_the_status_lra_names(self):
        lib = lra.load_library()
        self.assertIn(b"reduction", lib.lra_status_string(lra.REDUCTION_FAILED))

    def test_an_exception_in_the_reducer_is_the_cause_of_the_lra_error(self):
        boom = RuntimeError("collective failed")

        def reduce(values):
            raise boom

        opt, t, param, grad = sharded_sgd()
        opt.set_reduction(reduce)
        with self.assertRaises(lra.LraError) as ctx:
            opt.step(t, 1.0)
        self.assertEqual(ctx.exception.status, lra.REDUCTION_FAILED)
        self.assertIs(ctx.exception.__cause__, boom)
        self.assertEqual((param[0], opt.counters.steps), (1.0, 0))
        opt.set_reduction(lambda values: values)
        opt.step(t, 1.0)
        self.assertEqual(opt.counters.steps, 1)
        self.assert_nothing_escaped_into_c()

    def test_wrong_number_of_sums_is_a_value_error_cause(self):
        opt, t, param, grad = sharded_sgd()
        opt.set_reduction(lambda values: values[:-1])
        with self.assertRaises(lra.LraError) as ctx:
            opt.step(t, 1.0)
        self.assertEqual(ctx.exception.status, lra.REDUCTION_FAILED)
        self.assertIsInstance(ctx.exception.__cause__, ValueError)
        self.assertIn("returned 2 values for 3", str(ctx.exception.__cause__))
        self.assertEqual(param[0], 1.0)

    def test_keyboard_interrupt_in_the_reducer_propagates_and_changes_nothing(self):
        raise_in = set()

        def reduce(values):
            if len(values) in raise_in:
                raise KeyboardInterrupt
            return values

        opt, t, param, grad = sharded_sgd()
        opt.set_reduction(reduce)
        raise_in.add(3)  # the step's pre-write reduction
        with self.assertRaises(KeyboardInterrupt):
            opt.step(t, 1.0)
        self.assertEqual((param[0], opt.counters.steps), (1.0, 0))
        raise_in.clear()
        opt.step(t, 1.0)
        self.assertAlmostEqual(param[0], 0.9, places=6)
        raise_in.add(1)  # the re-evaluation's φ
        with self.assertRaises(KeyboardInterrupt):
            opt.report_reeval(0.5)
        self.assertEqual(opt.counters.reevals, 0)
        raise_in.clear()
        self.assertEqual(opt.report_reeval(0.5).decision_name, "raised")  # still pending
        self.assert_nothing_escaped_into_c()

    def test_system_exit_in_the_reducer_propagates(self):
        def reduce(values):
            raise SystemExit(3)

        opt, t, param, grad = sharded_sgd()
        opt.set_reduction(reduce)
        with self.assertRaises(SystemExit) as ctx:
            opt.step(t, 1.0)
        self.assertEqual(ctx.exception.code, 3)
        self.assertEqual((param[0], opt.counters.steps), (1.0, 0))
        self.assert_nothing_escaped_into_c()

    def test_ctrl_c_while_lra_computes_is_not_swallowed(self):
        # SIGINT arriving while lra scans the gradients (GIL released) makes
        # Python raise KeyboardInterrupt on the first line of the next
        # reduction's trampoline, outside its try: ctypes printed it and
        # gave lra an undefined status. Here the first reduction (the
        # rank-local loss) lets a thread interrupt the main thread as soon
        # as the GIL is free, i.e. during the scan before the second one.
        import _thread
        import ctypes
        import threading
        import time

        n = 1 << 20
        param, grad = (ctypes.c_float * n)(), (ctypes.c_float * n)()
        t = [(ctypes.addressof(param), ctypes.addressof(grad), n, lra.DTYPE_F32)]
        calls, go = [], threading.Event()

        def reduce(values):
            calls.append(len(values))
            if len(calls) == 1:
                go.set()
            return values

        opt = lra.Optimizer("sgd", sharding="sharded", loss_is_rank_local=True, num_threads=1)
        opt.set_reduction(reduce)
        for trial in range(5):
            calls.clear()
            go.clear()
            steps = opt.counters.steps
            interrupter = threading.Thread(target=lambda: (go.wait(), _thread.interrupt_main()))
            interrupter.start()
            raised = None
            try:
                try:
                    opt.step(t, 1.0)
                except KeyboardInterrupt:
                    raised = "step"
                interrupter.join()
                time.sleep(0.05)  # a later interrupt lands here
            except KeyboardInterrupt:
                raised = raised or "after"
            with self.subTest(trial=trial, calls=calls):
                self.assertIsNotNone(raised, "the interrupt was swallowed")
                if calls == [2]:  # interrupted before the pre-write reduction ran
                    self.assertEqual((raised, opt.counters.steps), ("step", steps))
                self.assert_nothing_escaped_into_c()

    def test_a_ctrl_c_at_any_point_of_a_call_leaves_the_object_usable(self):
        # Python raises KeyboardInterrupt for a SIGINT at a function entry or
        # as a builtin call returns. One real SIGINT at each such point of a
        # call (found with sys.setprofile, one point per run) must leave no
        # call counted in flight (close() refused for good: a Ctrl-C at
        # _InFlight.__exit__'s entry or after its lock's release) and
        # Python's SIGINT handler in place (a Ctrl-C inside signal.signal's
        # swap left the swapped handler installed; the next guarded call
        # took it for the previous one and every later Ctrl-C recursed).
        import gc
        import signal

        def inject(k, call):
            seen, hit = [0], [False]

            def hook(frame, event, arg):
                if event in ("call", "c_return"):
                    if seen[0] == k:
                        sys.setprofile(None)
                        hit[0] = True
                        signal.raise_signal(signal.SIGINT)
                    seen[0] += 1

            # An interrupted call leaves its Optimizer in a reference cycle
            # (exception, traceback, frame). Collected under the hook, that
            # Optimizer's __del__ took the SIGINT meant for the call, as an
            # unraisable exception, whenever the collector happened to run
            # there: no collection until the hook is gone.
            gc.disable()
            sys.setprofile(hook)
            try:
                try:
                    call()
                finally:
                    sys.setprofile(None)
                    gc.enable()
            except (KeyboardInterrupt, lra.LraError):
                pass
            return hit[0]

        calls = {
            "lr": lambda opt, t: opt.lr,
            "should_reeval": lambda opt, t: opt.should_reeval(),
            "step": lambda opt, t: opt.step(t, 1.0),
            "report_reeval": lambda opt, t: opt.report_reeval(0.5),
        }
        for name, call in calls.items():
            for k in range(1000):
                opt, t, param, grad = sharded_sgd()
                opt.set_reduction(lambda values: values)
                opt.step(t, 1.0)  # a pending step
                if not inject(k, lambda: call(opt, t)):
                    break  # every point was tried
                with self.subTest(call=name, point=k):
                    self.assertEqual(opt._in_flight, 0)
                    self.assertEqual(lra._INTERRUPTS.depth, 0)
                    self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)
                    opt.close()
                signal.signal(signal.SIGINT, signal.default_int_handler)
                opt._in_flight = 0
                opt.close()
            self.assertGreater(k, 5, name)
        self.assert_nothing_escaped_into_c()

    def test_a_ctrl_c_as_set_reduction_returns_keeps_the_callback_alive(self):
        # lra_set_reduction succeeded, then a Ctrl-C raised as it returned
        # unwound set_reduction before it kept the ctypes callback: lra held
        # the address of a freed callback (the next step called whichever
        # callback reused that memory).
        import gc
        import signal
        import weakref

        class Reduce:
            def __call__(self, values):
                return values

        class CtrlCAfterSetReduction:
            def __init__(self, lib):
                self.lib = lib

            def __getattr__(self, name):
                fn = getattr(self.lib, name)
                if name != "lra_set_reduction":
                    return fn

                def call(*args):
                    status = fn(*args)
                    signal.raise_signal(signal.SIGINT)  # handled as the C call returns
                    return status

                return call

        opt, t, param, grad = sharded_sgd()
        reduce = Reduce()
        alive = weakref.ref(reduce)
        lib, opt._lib = opt._lib, CtrlCAfterSetReduction(opt._lib)
        with self.assertRaises(KeyboardInterrupt):
            opt.set_reduction(reduce)
        opt._lib = lib
        del reduce
        gc.collect()
        self.assertIsNotNone(alive(), "lra holds a callback the binding let go")
        opt.step(t, 1.0)
        self.assertAlmostEqual(param[0], 0.9, places=6)

    def test_set_reduction_checks_callable_at_registration(self):
        opt, t, _, _ = sharded_sgd()
        with self.assertRaisesRegex(TypeError, "callable"):
            opt.set_reduction(42)
        with self.assertRaises(lra.LraError) as ctx:  # nothing was registered
            opt.step(t, 1.0)
        self.assertEqual(ctx.exception.status, lra.CALL_ORDER)


@unittest.skipIf(torch is None, "torch is not importable by this python")
class TorchAdapterAuditTests(unittest.TestCase):
    """What a PyTorch user runs into: layouts, devices, argument kinds, checkpoints."""

    def sgd_pair(self, make_param, lr=0.1):
        """(lra param, torch.optim param, lra optimizer, torch optimizer) on equal copies."""
        a, b = make_param(), make_param()
        return a, b, lra.TorchOptimizer([a], optimizer="sgd", lr=lr), torch.optim.SGD([b], lr=lr)

    def test_gradients_of_another_layout_are_copied_for_the_step(self):
        p = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
        opt = lra.TorchOptimizer([p], optimizer="sgd", lr=0.5)
        p.grad = torch.tensor([2.0]).expand(2, 3)  # stride 0
        opt.step(1.0)
        self.assertTrue(torch.equal(p.detach(), torch.arange(6.0).reshape(2, 3) - 1.0))
        p.grad = torch.arange(6.0).reshape(3, 2).t()  # transposed
        before = p.detach().clone()
        opt.step(1.0)
        expected = before - 0.5 * torch.arange(6.0).reshape(3, 2).t()
        self.assertTrue(torch.allclose(p.detach(), expected))

    def test_a_step_and_reeval_in_one_autocast_region_adapt_as_in_fp32(self):
        # Autocast caches low-precision copies of the weights: the
        # re-evaluation saw the weights before the step (f+ = f_i), every
        # step was lowered, and lr fell from 1e-3 to 1e-9 in 20 steps.
        def final_lr(autocast):
            torch.manual_seed(0)
            model = torch.nn.Linear(8, 1)
            x, y = torch.randn(64, 8), torch.randn(64, 1)
            opt = lra.TorchOptimizer(model.parameters(), optimizer="adam", lr=1e-3)

            def loss():
                return ((model(x).float() - y) ** 2).mean()

            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                for _ in range(20):
                    opt.zero_grad()
                    f = loss()
                    f.backward()
                    opt.step(f)
                    opt.reeval(loss)
            return opt.lr

        fp32, bf16 = final_lr(False), final_lr(True)
        self.assertGreater(fp32, 1e-2)  # raised along the way
        self.assertGreater(bf16, 0.5 * fp32)

    def test_a_state_dict_of_other_dtypes_is_refused_at_load(self):
        # It loaded into a fresh optimizer, and every step failed after.
        p32 = torch.nn.Parameter(torch.ones(4))
        a = lra.TorchOptimizer([p32], optimizer="adam")
        p32.grad = torch.ones(4)
        a.step(1.0)
        p16 = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        b = lra.TorchOptimizer([p16], optimizer="adam")
        with self.assertRaisesRegex(ValueError, "saved for parameter dtypes"):
            b.load_state_dict(a.state_dict())
        self.assertEqual(b.lra.counters.steps, 0)

    def test_a_torch_optimizer_cannot_be_copied_or_pickled(self):
        # copy.copy shared the handle: closing the copy closed the original.
        import copy
        import pickle

        opt = lra.TorchOptimizer([torch.nn.Parameter(torch.ones(2))], optimizer="sgd")
        for dup in (copy.copy, copy.deepcopy, pickle.dumps):
            with self.subTest(dup=dup.__name__):
                with self.assertRaisesRegex(TypeError, "cannot be copied or pickled"):
                    dup(opt)
        self.assertAlmostEqual(opt.lr, 1e-3)

    def test_a_parameter_made_an_inference_tensor_later_is_refused_before_the_update(self):
        # On torch < 2.1 the version bump after the update raised: the step
        # was applied and counted, and a retry stepped twice.
        p = torch.nn.Parameter(torch.ones(3))
        opt = lra.TorchOptimizer([p], optimizer="sgd", lr=0.5)
        with torch.inference_mode():
            p.data = torch.ones(3)
        p.grad = torch.ones(3)
        with self.assertRaisesRegex(ValueError, r"^parameter 0 \(3,\) is an inference tensor"):
            opt.step(1.0)
        self.assertEqual(opt.lra.counters.steps, 0)
        self.assertEqual(p.detach().tolist(), [1.0] * 3)

    def test_a_lazily_negated_gradient_is_materialised(self):
        # A neg-bit gradient's memory holds -g: passed as is, SGD moved the
        # parameter the wrong way.
        p = torch.nn.Parameter(torch.zeros(4))
        opt = lra.TorchOptimizer([p], optimizer="sgd", lr=0.5)
        p.grad = torch._neg_view(torch.ones(4))  # value -1, memory +1
        self.assertTrue(p.grad.is_neg())
        opt.step(1.0)
        self.assertEqual(p.detach().tolist(), [0.5] * 4)

    def test_a_zero_tensor_gradient_is_a_zero_gradient(self):
        # A ZeroTensor has no memory (data_ptr() is 0): lra refused the NULL.
        p = torch.nn.Parameter(torch.ones(4))
        opt = lra.TorchOptimizer([p], optimizer="sgd", lr=0.5)
        p.grad = torch._efficientzerotensor(4)
        opt.step(1.0)
        self.assertEqual(p.detach().tolist(), [1.0] * 4)
        self.assertEqual(opt.lra.counters.steps, 1)

    def test_a_lazily_negated_parameter_is_refused_at_construction(self):
        # Its memory holds -p: an update through the data pointer moved it
        # the wrong way.
        negated = torch._neg_view(torch.ones(4)).detach().requires_grad_()
        with self.assertRaisesRegex(ValueError, r"^parameter 0 is a lazily negated"):
            lra.TorchOptimizer([negated], optimizer="sgd")

    def test_a_parameter_negated_after_construction_is_refused_at_the_step(self):
        p = torch.nn.Parameter(torch.ones(4))
        opt = lra.TorchOptimizer([p], optimizer="sgd", lr=0.5)
        base = torch.ones(4)
        p.data = torch._neg_view(base)
        p.grad = torch.ones(4)
        with self.assertRaisesRegex(ValueError, r"^parameter 0 \(4,\) is a lazily negated"):
            opt.step(1.0)
        self.assertEqual(base.tolist(), [1.0] * 4)
        self.assertEqual(opt.lra.counters.steps, 0)

    def test_a_sparse_parameter_is_refused_at_construction(self):
        # It was accepted and failed only at the first step, through the
        # gradient's layout.
        sparse = torch.eye(3).to_sparse().requires_grad_()
        with self.assertRaisesRegex(ValueError, r"^parameter 0 has layout .*: .*dense \(strided\)"):
            lra.TorchOptimizer([sparse], optimizer="sgd")

    def test_a_zero_tensor_parameter_is_refused_at_construction(self):
        # It has no memory to update (data_ptr() is 0).
        zero = torch._efficientzerotensor(4).requires_grad_()
        with self.assertRaisesRegex(ValueError, r"^parameter 0 is a ZeroTensor"):
            lra.TorchOptimizer([zero], optimizer="sgd")

    def test_channels_last_parameters_train_like_torch_optim(self):
        def make():
            torch.manual_seed(1)
            return torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)

        x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
        a, b = make(), make()
        self.assertFalse(a.weight.is_contiguous())
        opt_a = lra.TorchOptimizer(a.parameters(), optimizer="momentum", lr=0.05)
        opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.5)
        for _ in range(3):
            for model, opt in ((a, opt_a), (b, opt_b)):
                opt.zero_grad()
                loss = model(x).square().mean()
                loss.backward()
                opt.step(loss) if opt is opt_a else opt.step()
        self.assertTrue(torch.allclose(a.weight, b.weight, atol=1e-6))
        # The optimizer state follows memory order: a later layout change is refused.
        a.to(memory_format=torch.contiguous_format)
        opt_a.zero_grad()
        a(x.contiguous()).square().mean().backward()
        with self.assertRaisesRegex(ValueError, "memory layout"):
            opt_a.step(1.0)

    def test_view_that_skips_memory_is_refused_untouched(self):
        base = torch.zeros(3, 4)
        p = torch.nn.Parameter(base[:, :2])  # a leaf viewing every other pair of elements
        p.grad = torch.ones(3, 2)
        opt = lra.TorchOptimizer([p], optimizer="sgd")
        with self.assertRaisesRegex(ValueError, "does not cover its memory densely"):
            opt.step(1.0)
        self.assertTrue(torch.equal(base, torch.zeros(3, 4)))

    def test_parameter_moved_off_the_handles_device_is_refused(self):
        p = torch.nn.Parameter(torch.ones(4))
        opt = lra.TorchOptimizer([p], optimizer="sgd")
        moved = torch.nn.Parameter(torch.empty(4, device="meta"))
        moved.grad = torch.empty(4, device="meta")
        opt.params[0] = moved  # what model.to(other device) does to the parameter
        with self.assertRaisesRegex(ValueError, "now on meta"):
            opt.step(1.0)

    def test_device_keyword_contradicting_the_parameters_is_refused(self):
        p = torch.nn.Parameter(torch.ones(4))
        with self.assertRaisesRegex(ValueError, "contradicts the parameters' device"):
            lra.TorchOptimizer([p], optimizer="sgd", device="cuda")
        lra.TorchOptimizer([p], optimizer="sgd", device="cpu").close()
        with self.assertRaisesRegex(ValueError, "device: unknown name 'gpu'"):
            lra.TorchOptimizer([p], optimizer="sgd", device="gpu")

    def test_params_argument_mistakes_fail_at_construction(self):
        p = torch.nn.Parameter(torch.ones(4))
        with self.assertRaisesRegex(TypeError, "not one tensor"):
            lra.TorchOptimizer(p)
        with self.assertRaisesRegex(TypeError, "parameter groups"):
            lra.TorchOptimizer([{"params": [p], "lr": 1e-3}])
        with self.assertRaisesRegex(ValueError, "not a leaf"):
            lra.TorchOptimizer([p * 2])
        # Its version counter cannot be bumped after a step: refused up front.
        with torch.inference_mode():
            inference = torch.ones(3, requires_grad=True)
        with self.assertRaisesRegex(ValueError, "parameter 1 is an inference tensor"):
            lra.TorchOptimizer([p, inference])
        with self.assertRaisesRegex(ValueError, "parameter 1 is parameter 0 again"):
            lra.TorchOptimizer([p, p])

    def test_mixed_dtypes_in_one_optimizer(self):
        ps = [torch.nn.Parameter(torch.full((8,), 1.0, dtype=dt))
              for dt in (torch.float32, torch.bfloat16, torch.float16)]
        for p in ps:
            p.grad = torch.full((8,), 0.25, dtype=p.dtype)
        opt = lra.TorchOptimizer(ps, optimizer="sgd", lr=0.5)
        opt.step(1.0)
        for p in ps:
            self.assertTrue(torch.equal(p.detach(), torch.full((8,), 0.875, dtype=p.dtype)), p)

    def test_step_tells_autograd_the_parameters_changed(self):
        # lra writes through raw pointers: without a version bump a graph
        # that saved the parameter silently backpropagated through the new
        # values, where torch.optim raises.
        p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        opt = lra.TorchOptimizer([p], optimizer="sgd", lr=0.1)
        loss = (p * p).sum()  # saves p for backward
        loss.backward(retain_graph=True)
        version = p._version
        opt.step(loss)
        self.assertGreater(p._version, version)
        with self.assertRaisesRegex(RuntimeError, "modified by an inplace operation"):
            loss.backward()

    def test_with_closes_the_handle(self):
        p = torch.nn.Parameter(torch.ones(2))
        with lra.TorchOptimizer([p], optimizer="sgd") as opt:
            self.assertAlmostEqual(opt.lr, 1e-3)
        with self.assertRaisesRegex(lra.LraError, "closed"):
            opt.lr

    def test_messages_name_parameters_by_their_position_in_the_given_list(self):
        # Frozen parameters are left out; a message naming a parameter by its
        # index among the trainable ones pointed at the wrong tensor.
        frozen = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
        q = torch.nn.Parameter(torch.zeros(3))
        opt = lra.TorchOptimizer([frozen, q], optimizer="sgd")
        with self.assertRaisesRegex(ValueError, r"^parameter 1 \(3,\) has no gradient"):
            opt.step(1.0)
        with self.assertRaisesRegex(ValueError, r"^parameter 2 is not a leaf"):
            lra.TorchOptimizer([frozen, q, q * 2])

    def test_zero_grad_like_torch_optim(self):
        p = torch.nn.Parameter(torch.ones(3))
        opt = lra.TorchOptimizer([p], optimizer="sgd", lr=0.1)
        (p * p).sum().backward()
        opt.zero_grad(set_to_none=False)
        self.assertTrue(torch.equal(p.grad, torch.zeros(3)))
        opt.zero_grad()
        self.assertIsNone(p.grad)
        self.assertIs(opt.param_groups[0]["params"][0], p)

    def test_the_param_groups_lr_is_eta(self):
        p = torch.nn.Parameter(torch.ones(3))
        opt = lra.TorchOptimizer([p], optimizer="sgd", lr=0.25)
        group = opt.param_groups[0]
        self.assertIs(opt.param_groups[0], group)
        self.assertEqual(dict(group), {"params": [p], "lr": 0.25})
        # Written the way warm-up code writes torch.optim's: η from the next step.
        for g in opt.param_groups:
            g["lr"] = 0.125
        self.assertEqual(opt.lr, 0.125)
        (p * p).sum().backward()
        opt.step((p * p).sum())
        self.assertTrue(torch.equal(p.detach(), torch.full((3,), 1 - 0.125 * 2)))
        info = opt.reeval(lambda: (p * p).sum())
        self.assertEqual(info.lr_before, 0.125)
        self.assertEqual(group["lr"], info.lr)
        for key in ("weight_decay", "params"):
            with self.assertRaisesRegex(KeyError, "fixed when the optimizer is created"):
                group[key] = 0.0
        with self.assertRaises(KeyError):
            del group["lr"]
        with self.assertRaises(lra.LraError):
            group["lr"] = -1.0
        self.assertEqual(group["lr"], info.lr)
        # A copy is a snapshot dict (the handle cannot be copied), as
        # torch.save of param_groups or copy.deepcopy of them make.
        import copy
        import pickle
        for snapshot in (copy.deepcopy(opt.param_groups)[0], pickle.loads(pickle.dumps(group))):
            self.assertEqual(type(snapshot), dict)
            self.assertEqual(snapshot["lr"], info.lr)
            self.assertTrue(torch.equal(snapshot["params"][0], p))
        opt.close()
        self.assertIn("lr", group)
        self.assertIn("handle closed", repr(group))

    def test_state_dict_survives_torch_save_and_resumes_before_any_step(self):
        import io

        def run(opt, p, steps):
            for k in range(steps):
                opt.zero_grad()
                loss = ((p - k) ** 2).sum()
                loss.backward()
                opt.step(loss)
                opt.reeval(lambda: ((p - k) ** 2).sum())

        p = torch.nn.Parameter(torch.ones(2, 3))
        a = lra.TorchOptimizer([p], optimizer="adam", lr=0.01)
        run(a, p, 3)
        buf = io.BytesIO()
        torch.save({"model": p.detach().clone(), "opt": a.state_dict()}, buf)
        buf.seek(0)
        # weights_only: torch >= 2.6's default; bytes failed it on torch 1.13.
        ckpt = torch.load(buf, weights_only=True)
        q = torch.nn.Parameter(ckpt["model"].clone())
        b = lra.TorchOptimizer([q], optimizer="adam", lr=0.01)
        b.load_state_dict(ckpt["opt"])  # a fresh optimizer, as when resuming
        run(a, p, 2)
        run(b, q, 2)
        self.assertTrue(torch.equal(p.detach(), q.detach()))
        self.assertEqual(a.lr, b.lr)
        # Same element count, other shapes: refused, not silently misapplied.
        r = torch.nn.Parameter(torch.ones(3, 2))
        c = lra.TorchOptimizer([r], optimizer="adam", lr=0.01)
        with self.assertRaisesRegex(ValueError, "shapes"):
            c.load_state_dict(ckpt["opt"])
        with self.assertRaisesRegex(ValueError, "not a state_dict of lra"):
            c.load_state_dict(torch.optim.Adam([r]).state_dict())
        # The checkpoint as bytes (dicts of earlier versions) still loads; a
        # tensor of another dtype or shape is refused and changes nothing.
        s = lra.TorchOptimizer([torch.nn.Parameter(ckpt["model"].clone())],
                               optimizer="adam", lr=0.01)
        raw = bytes(ckpt["opt"]["lra_state"].tolist())
        for bad in (ckpt["opt"]["lra_state"].float(), ckpt["opt"]["lra_state"].view(1, -1), "x"):
            with self.assertRaisesRegex(ValueError, "'lra_state' is"):
                s.load_state_dict(dict(ckpt["opt"], lra_state=bad))
            self.assertEqual(s.lra.counters.steps, 0)
        s.load_state_dict(dict(ckpt["opt"], lra_state=raw))
        self.assertEqual(s.lra.save_state(), raw)

    def test_state_dict_refuses_another_memory_layout_and_keeps_the_saved_one(self):
        def conv(memory_format):
            torch.manual_seed(2)
            return torch.nn.Conv2d(3, 4, 3).to(memory_format=memory_format)

        def train(model, opt, x, steps):
            for _ in range(steps):
                opt.zero_grad()
                loss = model(x).square().mean()
                loss.backward()
                opt.step(loss)
                opt.reeval(lambda: model(x).square().mean())

        def assert_channels_last_is_refused(model, opt):
            model.to(memory_format=torch.channels_last)
            opt.zero_grad()
            model(x).square().mean().backward()
            with self.assertRaisesRegex(ValueError, "memory layout"):
                opt.step(1.0)

        x = torch.randn(2, 3, 6, 6)
        a = conv(torch.contiguous_format)
        opt_a = lra.TorchOptimizer(a.parameters(), optimizer="adam", lr=0.01)
        train(a, opt_a, x, 2)
        saved = opt_a.state_dict()
        weights = {k: v.clone() for k, v in a.state_dict().items()}

        # The same shapes in channels_last: each element would get another
        # element's Adam state. Refused, and the fresh optimizer is untouched.
        b = conv(torch.channels_last)
        b.load_state_dict(weights)
        opt_b = lra.TorchOptimizer(b.parameters(), optimizer="adam", lr=0.01)
        fresh = opt_b.lra.save_state()
        with self.assertRaisesRegex(ValueError, "parameter 0 .* another memory layout"):
            opt_b.load_state_dict(saved)
        self.assertEqual(opt_b.lra.save_state(), fresh)
        for bad in (5, [5], saved["memory_orders"][:1]):
            with self.assertRaisesRegex(ValueError, "memory_orders|memory layouts of 1"):
                opt_b.load_state_dict(dict(saved, memory_orders=bad))
        self.assertEqual(opt_b.lra.save_state(), fresh)

        # Converted back to the saved layout, it resumes bit for bit.
        b.to(memory_format=torch.contiguous_format)
        opt_b.load_state_dict(saved)
        train(a, opt_a, x, 2)
        train(b, opt_b, x, 2)
        for k, v in a.state_dict().items():
            self.assertTrue(torch.equal(v, b.state_dict()[k]), k)

        # The loaded layout is fixed as if opt_b had taken the saved steps.
        c = conv(torch.contiguous_format)
        opt_c = lra.TorchOptimizer(c.parameters(), optimizer="adam", lr=0.01)
        opt_c.load_state_dict(saved)
        assert_channels_last_is_refused(c, opt_c)

        # Optimizer state loaded without a layout check (a dict of an earlier
        # version, without "memory_orders") takes the parameters' current
        # layout, as a first step here would: it is fixed from then on and
        # recorded by the next state_dict, which never loads unchecked.
        e = conv(torch.contiguous_format)
        opt_e = lra.TorchOptimizer(e.parameters(), optimizer="adam", lr=0.01)
        opt_e.load_state_dict({k: v for k, v in saved.items() if k != "memory_orders"})
        resaved = opt_e.state_dict()
        self.assertEqual(resaved["memory_orders"], saved["memory_orders"])
        f = conv(torch.channels_last)
        opt_f = lra.TorchOptimizer(f.parameters(), optimizer="adam", lr=0.01)
        with self.assertRaisesRegex(ValueError, "another memory layout"):
            opt_f.load_state_dict(resaved)
        self.assertEqual(opt_f.lra.counters.steps, 0)
        assert_channels_last_is_refused(e, opt_e)

        # A state_dict saved before any step has no layout yet: it loads into
        # either layout.
        d = conv(torch.channels_last)
        opt_d = lra.TorchOptimizer(d.parameters(), optimizer="adam", lr=0.01)
        before_any_step = lra.TorchOptimizer(conv(torch.contiguous_format).parameters(),
                                             optimizer="adam", lr=0.01).state_dict()
        self.assertIsNone(before_any_step["memory_orders"])
        opt_d.load_state_dict(before_any_step)
        train(d, opt_d, x, 1)

if __name__ == "__main__":
    unittest.main()
