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


def f32_buffer(values):
    import ctypes

    return (ctypes.c_float * len(values))(*values)


class RawHandleTests(unittest.TestCase):
    def test_version_and_defaults(self):
        self.assertEqual(lra.version()[0], 0)
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


if __name__ == "__main__":
    unittest.main()
