"""Python binding of lra (automatic learning-rate adaptation) over its C ABI.

Pure ``ctypes``: nothing to compile. The shared library is ``$LRA_LIBRARY``
(a path to ``liblra.so``) when that is set, and an error if it does not load;
otherwise the first of ``$CARGO_TARGET_DIR/release`` (a relative one taken
from the repository root, where cargo run from the root puts it) and the repository's
``target/release`` (both only from a checkout), then the system loader
(``ctypes.util``).

Two layers:

* :class:`Optimizer` owns one ``lra_handle`` and takes raw tensor lists
  (``(param_ptr, grad_ptr, numel, dtype)`` tuples or :class:`Tensor` structs;
  :func:`numpy_tensor` makes a checked one from two numpy arrays).
* :class:`TorchOptimizer` takes a list of ``torch`` parameters and gathers the
  pointers of the parameters and of their CURRENT gradients at every step.

One iteration (the paper's Algorithm 1)::

    opt = lra.TorchOptimizer(model.parameters(), optimizer="adam", lr=1e-4)
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step(loss)                                   # the optimizer step with the current lr
    opt.reeval(lambda: loss_fn(model(x), y))         # same batch, under no_grad; adapts lr

The re-evaluation must compare like with like: the SAME batch, and a model
whose forward pass is deterministic between the two evaluations (dropout
off or with the same mask, BatchNorm not updating running statistics, i.e.
``model.eval()`` semantics for the second pass when the first used them).
"""

import collections.abc
import ctypes
import ctypes.util
import operator
import os
import re
import signal
import threading

# The release of lra this module was written for (Cargo.toml's version; the
# tests check it against both Cargo.toml and the loaded library).
__version__ = "0.1.0"

__all__ = [
    "LraError",
    "Config",
    "Tensor",
    "ReevalInfo",
    "Counters",
    "Optimizer",
    "TorchOptimizer",
    "numpy_tensor",
    "load_library",
    "version",
    "OPTIMIZERS",
    "DTYPE_F32",
    "DTYPE_F16",
    "DTYPE_BF16",
    "DEVICE_HOST",
    "DEVICE_CUDA",
    "STATUSES",
    "OK",
    "NULL_POINTER",
    "INVALID_ARGUMENT",
    "INVALID_CONFIG",
    "CALL_ORDER",
    "SIZE_MISMATCH",
    "NO_CUDA",
    "CUDA_ERROR",
    "BAD_CHECKPOINT",
    "BUFFER_TOO_SMALL",
    "PANIC",
    "UNSUPPORTED",
    "REDUCTION_FAILED",
    "OUT_OF_MEMORY",
]

# --- constants (values are part of the C ABI; see include/lra.h) -----------

OPTIMIZERS = {
    "sgd": 0,
    "momentum": 1,
    "nesterov": 2,
    "adagrad": 3,
    "rmsprop": 4,
    "adam": 5,
    "adamw": 6,
}
DTYPE_F32, DTYPE_F16, DTYPE_BF16 = 0, 1, 2
DEVICE_HOST, DEVICE_CUDA = 0, 1
DECISIONS = {0: "kept", 1: "raised", 2: "lowered", 3: "skipped"}
SKIP_REASONS = {
    0: "none",
    1: "nonfinite_loss",
    2: "nonfinite_grad",
    3: "found_inf",
    4: "nonpositive_phi",
    5: "nonfinite_phi",
    # 6 is reserved: this release never reports it (s = 0 steps are judged).
    6: "zero_scale",
}
REEVAL_SCHEDULES = {"always": 0, "every": 1, "geometric": 2}
SHARDINGS = {"replicated": 0, "sharded": 1}

# lra_status values (src/error.rs `Status`): what ``LraError.status`` holds.
OK = 0
NULL_POINTER = 1
INVALID_ARGUMENT = 2
INVALID_CONFIG = 3
CALL_ORDER = 4
SIZE_MISMATCH = 5
NO_CUDA = 6
CUDA_ERROR = 7
BAD_CHECKPOINT = 8
BUFFER_TOO_SMALL = 9
PANIC = 10
UNSUPPORTED = 11
REDUCTION_FAILED = 12
OUT_OF_MEMORY = 13
STATUSES = {
    OK: "OK",
    NULL_POINTER: "NULL_POINTER",
    INVALID_ARGUMENT: "INVALID_ARGUMENT",
    INVALID_CONFIG: "INVALID_CONFIG",
    CALL_ORDER: "CALL_ORDER",
    SIZE_MISMATCH: "SIZE_MISMATCH",
    NO_CUDA: "NO_CUDA",
    CUDA_ERROR: "CUDA_ERROR",
    BAD_CHECKPOINT: "BAD_CHECKPOINT",
    BUFFER_TOO_SMALL: "BUFFER_TOO_SMALL",
    PANIC: "PANIC",
    UNSUPPORTED: "UNSUPPORTED",
    REDUCTION_FAILED: "REDUCTION_FAILED",
    OUT_OF_MEMORY: "OUT_OF_MEMORY",
}

# --- C structs --------------------------------------------------------------


class Config(ctypes.Structure):
    """``lra_config``; fill with :meth:`Optimizer.default_config` first."""

    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("optimizer", ctypes.c_uint32),
        ("device", ctypes.c_uint32),
        ("device_ordinal", ctypes.c_int32),
        ("lr", ctypes.c_double),
        ("momentum", ctypes.c_double),
        ("alpha", ctypes.c_double),
        ("beta1", ctypes.c_double),
        ("beta2", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("f_star", ctypes.c_double),
        ("factor_up", ctypes.c_double),
        ("factor_down", ctypes.c_double),
        ("threshold_up", ctypes.c_double),
        ("threshold_down", ctypes.c_double),
        ("lr_min", ctypes.c_double),
        ("lr_max", ctypes.c_double),
        ("scale_max", ctypes.c_double),
        ("denom_eps", ctypes.c_double),
        ("check_finite", ctypes.c_uint32),
        ("num_threads", ctypes.c_uint32),
        ("reeval_schedule", ctypes.c_uint32),
        ("reeval_every", ctypes.c_uint32),
        ("reeval_growth", ctypes.c_double),
        ("sharding", ctypes.c_uint32),
        ("loss_is_rank_local", ctypes.c_uint32),
    ]


class Tensor(ctypes.Structure):
    """``lra_tensor``: one parameter buffer and its gradient. ``reserved``
    must be 0 (lra refuses the step otherwise); ctypes zero-fills it, so
    ``Tensor(param, grad, numel, dtype)`` leaves it so."""

    _fields_ = [
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("numel", ctypes.c_uint64),
        ("dtype", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class ReevalInfo(ctypes.Structure):
    """``lra_reeval_info``: what one re-evaluation found and decided."""

    _fields_ = [
        ("phi", ctypes.c_double),
        ("rho", ctypes.c_double),
        ("scale", ctypes.c_double),
        ("lr_before", ctypes.c_double),
        ("lr", ctypes.c_double),
        ("decision", ctypes.c_uint32),
        ("skip_reason", ctypes.c_uint32),
    ]

    @property
    def decision_name(self):
        return DECISIONS.get(self.decision, str(self.decision))

    @property
    def skip_reason_name(self):
        return SKIP_REASONS.get(self.skip_reason, str(self.skip_reason))

    def __repr__(self):
        return (
            f"ReevalInfo(phi={self.phi!r}, rho={self.rho!r}, scale={self.scale!r}, "
            f"lr_before={self.lr_before!r}, lr={self.lr!r}, decision={self.decision_name}, "
            f"skip_reason={self.skip_reason_name})"
        )


class Counters(ctypes.Structure):
    """``lra_counters``."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "steps",
            "applied",
            "skipped",
            "reevals",
            "raised",
            "lowered",
            "kept",
            "reeval_skipped",
        )
    ]

    def as_dict(self):
        return {name: getattr(self, name) for name, _ in self._fields_}

    def __repr__(self):
        return f"Counters({self.as_dict()})"


REDUCE_FN = ctypes.CFUNCTYPE(
    ctypes.c_int32, ctypes.POINTER(ctypes.c_double), ctypes.c_size_t, ctypes.c_void_p
)

# --- library loading --------------------------------------------------------

_HANDLE = ctypes.c_void_p
_STATUS = ctypes.c_uint32

# name: (restype, argtypes), exactly the prototypes of include/lra.h.
_PROTOTYPES = {
    "lra_config_init": (None, [ctypes.POINTER(Config), ctypes.c_uint32]),
    "lra_create": (_STATUS, [ctypes.POINTER(Config), ctypes.POINTER(_HANDLE)]),
    "lra_destroy": (None, [_HANDLE]),
    "lra_step": (
        _STATUS,
        [
            _HANDLE,
            ctypes.POINTER(Tensor),
            ctypes.c_size_t,
            ctypes.c_double,
            ctypes.c_double,
            ctypes.c_void_p,
        ],
    ),
    "lra_step_ex": (
        _STATUS,
        [
            _HANDLE,
            ctypes.POINTER(Tensor),
            ctypes.c_size_t,
            ctypes.c_double,
            ctypes.c_double,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ],
    ),
    "lra_report_reeval": (
        _STATUS,
        [_HANDLE, ctypes.c_double, ctypes.POINTER(ReevalInfo)],
    ),
    "lra_get_last_reeval": (_STATUS, [_HANDLE, ctypes.POINTER(ReevalInfo)]),
    "lra_get_lr": (_STATUS, [_HANDLE, ctypes.POINTER(ctypes.c_double)]),
    "lra_set_lr": (_STATUS, [_HANDLE, ctypes.c_double]),
    "lra_get_last_phi": (_STATUS, [_HANDLE, ctypes.POINTER(ctypes.c_double)]),
    "lra_get_counters": (_STATUS, [_HANDLE, ctypes.POINTER(Counters)]),
    "lra_should_reeval": (_STATUS, [_HANDLE, ctypes.POINTER(ctypes.c_uint32)]),
    "lra_state_size": (_STATUS, [_HANDLE, ctypes.POINTER(ctypes.c_size_t)]),
    "lra_save_state": (
        _STATUS,
        [_HANDLE, ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)],
    ),
    "lra_load_state": (_STATUS, [_HANDLE, ctypes.c_void_p, ctypes.c_size_t]),
    "lra_set_reduction": (_STATUS, [_HANDLE, REDUCE_FN, ctypes.c_void_p]),
    "lra_status_string": (ctypes.c_char_p, [_STATUS]),
    "lra_last_error": (ctypes.c_char_p, [_HANDLE]),
    "lra_thread_last_error": (ctypes.c_char_p, []),
    "lra_version": (ctypes.c_uint32, []),
}

_lib = None


def _candidate_paths():
    env = os.environ.get("LRA_LIBRARY")
    if env:
        # An explicit choice: no fallback to another library behind it.
        yield env
        return
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    # Only from a checkout (bindings/python inside the repository), not
    # from an installed copy, where these paths would mean nothing.
    if os.path.exists(os.path.join(repo, "Cargo.toml")):
        target = os.environ.get("CARGO_TARGET_DIR")
        if target:
            yield os.path.join(repo, target, "release", "liblra.so")
        yield os.path.join(repo, "target", "release", "liblra.so")
    found = ctypes.util.find_library("lra")
    if found:
        yield found


def _abi(release):
    """The part of a (major, minor, patch) release that names its ABI:
    major from 1.0 on, major.minor before (the SONAME's rule)."""
    return release[:1] if release[0] >= 1 else release[:2]


def load_library(path=None):
    """Loads (once) and returns the ``ctypes.CDLL`` of liblra with typed prototypes."""
    global _lib
    if _lib is not None and path is None:
        return _lib
    tried = []
    for candidate in [path] if path else _candidate_paths():
        if os.sep in candidate and not os.path.exists(candidate):
            tried.append(candidate + " (missing)")
            continue
        try:
            lib = ctypes.CDLL(candidate)
        except OSError as e:
            tried.append(f"{candidate} ({e})")
            continue
        missing = [name for name in _PROTOTYPES if not hasattr(lib, name)]
        if missing:
            tried.append(f"{candidate} (not this lra: it lacks {', '.join(missing[:3])})")
            continue
        for name, (restype, argtypes) in _PROTOTYPES.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        # Another ABI's structs may differ from the ones declared here.
        v = lib.lra_version()
        found = (v >> 16, (v >> 8) & 0xFF, v & 0xFF)
        mine = tuple(int(x) for x in __version__.split("."))
        if _abi(found) != _abi(mine):
            tried.append(
                f"{candidate} (lra {'.'.join(map(str, found))}, another ABI than this "
                f"module's {__version__})"
            )
            continue
        _lib = lib
        return lib
    if path is None and os.environ.get("LRA_LIBRARY"):
        raise OSError("LRA_LIBRARY does not load: " + "; ".join(tried))
    if path is None:
        tried.append("the system loader (ctypes.util.find_library('lra')): nothing")
    raise OSError(
        "liblra not found: set LRA_LIBRARY=/path/to/liblra.so (an install: "
        "PREFIX/lib/liblra.so; a checkout: target/release/liblra.so after "
        "`cargo build --release --lib`). Tried: " + "; ".join(tried)
    )


def version():
    """The library version as a ``(major, minor, patch)`` tuple."""
    v = load_library().lra_version()
    return (v >> 16, (v >> 8) & 0xFF, v & 0xFF)


class LraError(RuntimeError):
    """A failed lra call: ``status`` (an ``lra_status``) and the library's message."""

    def __init__(self, status, message):
        # Both in args: pickling rebuilds the error as cls(*args), which is
        # how it crosses a process boundary (multiprocessing, concurrent.futures).
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self):
        name = STATUSES.get(self.status)
        status = f"{self.status} ({name})" if name else f"{self.status}"
        return f"lra status {status}: {self.message}"


def _decode(p):
    return p.decode("utf-8", "replace") if p else ""


def _number(what, x):
    """``float(x)``, except for text: float("1.0") would take a string that
    is most likely a mistake (a loss read from a log line, say)."""
    if isinstance(x, (str, bytes, bytearray)):
        raise TypeError(f"{what} must be a number, not {type(x).__name__}")
    return float(x)


_DEVICE_NAMES = {"host": DEVICE_HOST, "cpu": DEVICE_HOST, "cuda": DEVICE_CUDA}
_NAMED_FIELDS = {"device": _DEVICE_NAMES, "reeval_schedule": REEVAL_SCHEDULES, "sharding": SHARDINGS}


def _named_value(field, names, value):
    # Case-insensitive, as optimizer names are ("Adam", "CUDA").
    if value.lower() not in names:
        raise ValueError(f"{field}: unknown name {value!r}; valid names: {', '.join(names)}")
    return names[value.lower()]


def _int_value(field, ctype, value):
    """``value`` as an int that ``ctype`` holds unchanged.

    ctypes stores integers modulo 2**bits without complaint: -1 threads
    would become 4294967295, which lra accepts.
    """
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{field} must be an integer, not {type(value).__name__}") from None
    bits = 8 * ctypes.sizeof(ctype)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if ctype(-1).value < 0 else (0, (1 << bits) - 1)
    if not lo <= value <= hi:
        raise ValueError(f"{field} = {value} is outside the range of its C type [{lo}, {hi}]")
    return value


def _config_value(key, value):
    """The ``lra_config`` value for keyword ``key`` (names of enums accepted).

    Unknown fields raise ``TypeError``, unknown names and integers their C
    field cannot hold ``ValueError``; lra_create checks the rest.
    """
    ctype = dict(Config._fields_).get(key)
    if ctype is None or key == "struct_size":
        raise TypeError(f"unknown lra_config field {key!r}")
    if key in _NAMED_FIELDS and isinstance(value, str):
        return _named_value(key, _NAMED_FIELDS[key], value)
    if key in ("check_finite", "loss_is_rank_local"):
        # bool(None) and bool("false") would turn a typo into a setting.
        if not isinstance(value, (bool, int)) or value not in (0, 1):
            raise ValueError(f"{key} must be True/False or 1/0, not {value!r}")
        return int(value)
    if ctype is ctypes.c_double:
        return value
    return _int_value(key, ctype, value)


def _tensor_from_tuple(i, t):
    """A :class:`Tensor` from ``(param_ptr, grad_ptr, numel, dtype)``; ctypes
    would store ``numel = 2**64 + 3`` as 3 and ``dtype = 2**32`` as f32."""
    try:
        param, grad, numel, dtype = t
    except ValueError:  # e.g. (param_array, grad_array)
        raise ValueError(
            f"tensors[{i}] is not a (param_ptr, grad_ptr, numel, dtype) tuple; "
            "for numpy arrays pass lra.numpy_tensor(param, grad)"
        ) from None

    def pointer(what, p):  # None, ctypes pointers and the like: ctypes checks those
        return _int_value(f"tensors[{i}].{what}", ctypes.c_size_t, p) if isinstance(p, int) else p

    return Tensor(
        pointer("param", param),
        pointer("grad", grad),
        _int_value(f"tensors[{i}].numel", ctypes.c_uint64, numel),
        _int_value(f"tensors[{i}].dtype", ctypes.c_uint32, dtype),
    )


# --- the handle -------------------------------------------------------------


class _InterruptDeferral:
    """Keeps Ctrl-C from landing where ctypes would swallow it.

    Python raises ``KeyboardInterrupt`` at the next bytecode after SIGINT.
    While lra computes (the GIL released), that is the first line of the
    reduction trampoline, before its ``try``: ctypes would print the
    exception and hand lra an undefined status (0 reads as "reduced", and
    ranks diverge). So during a call that may run the trampoline (main
    thread, a Python SIGINT handler installed) the handler is swapped for
    one that holds the signal back except where raising is safe: inside
    the trampoline's ``try`` (the call then fails and changes nothing) or
    after the C call returned. Only the main thread touches this state.
    """

    def __init__(self):
        self.prev = None  # the Python handler replaced while depth > 0
        self.depth = 0  # guarded calls in flight on the main thread
        self.safe = True  # whether a KeyboardInterrupt may be raised now
        self.held = None  # (signum, frame) of a signal held back
        self.handler = self._handle  # one bound method, to recognize it

    def _handle(self, signum, frame):
        if self.safe:
            self.prev(signum, frame)
        else:
            self.held = (signum, frame)

    def deliver(self):
        """Runs the replaced handler for a held signal (it raises, usually)."""
        held, self.held = self.held, None
        if held is not None:
            self.prev(*held)

    def enter(self):
        """Before a C call that may run the trampoline; returns the token for :meth:`leave`."""
        if threading.get_ident() != _MAIN_THREAD:
            return None  # Python runs signal handlers on the main thread only
        saved = self.safe
        if self.depth == 0:
            prev = signal.getsignal(signal.SIGINT)
            if prev == self.handler:
                # Left installed by someone who saved and restored it around
                # a call: calling it as "the previous handler" would recurse.
                prev = self.prev
            if not callable(prev):
                return None  # SIG_IGN, SIG_DFL or a C handler: nothing raises in Python
            self.prev = prev  # before the swap: a signal may be handled right after it
            # Unsafe before the swap: a signal handled right after it (the
            # kernel delivers a pending one as the sigaction call returns)
            # must be held, not raised out of here with the handler swapped
            # and depth still 0.
            self.safe = False
            try:
                signal.signal(signal.SIGINT, self.handler)  # a pending signal raises here, unswapped
            except BaseException as exc:
                self.safe = saved
                if isinstance(exc, ValueError):
                    return None  # not the main interpreter
                raise
        self.depth += 1
        self.safe = False
        return saved

    def leave(self, token):
        """After the C call returned: restores the handler, then delivers what was held."""
        if token is None:
            return
        self.depth -= 1
        try:
            if self.depth == 0 and signal.getsignal(signal.SIGINT) == self.handler:
                # Still unsafe: a signal handled during the swap is held, not raised mid-way.
                signal.signal(signal.SIGINT, self.prev)
        finally:
            self.safe = token
        if token:
            self.deliver()

    def open(self):
        """In the trampoline's ``try``: makes raising safe, delivers what was held.

        Returns the token that the trampoline's ``finally`` writes back to
        ``safe`` inline (a call would first run pending signal handlers,
        raising outside the ``try``); None: nothing to write back.
        """
        if not self.depth or threading.get_ident() != _MAIN_THREAD:
            return None
        saved, self.safe = self.safe, True
        try:
            self.deliver()
        except BaseException:
            self.safe = saved
            raise
        return saved


_MAIN_THREAD = threading.main_thread().ident
_INTERRUPTS = _InterruptDeferral()


class Optimizer:
    """One lra handle: the wrapped optimizer plus its learning-rate adaptation.

    ``optimizer`` is a name from :data:`OPTIMIZERS` or its number; every
    other keyword sets the ``lra_config`` field of that name after the
    defaults are filled in (``lr``, ``beta1``, ``device``, ``reeval_schedule``
    (name or number), ``sharding`` (name or number), ...). An unknown
    field raises ``TypeError``; an unknown name, or an integer the field's
    C type cannot hold (``num_threads=-1``), ``ValueError``.

    One object may be used from several threads: calls release the GIL,
    and lra refuses overlapping calls on one handle (``LRA_CALL_ORDER``).
    """

    def __init__(self, optimizer="adam", **config):
        # First: close() (and so __del__) reads these even when __init__ fails.
        self._lock = threading.Lock()
        self._in_flight = 0  # calls passing the handle to C now (see _call)
        self._h = _HANDLE()
        self._reducer = None  # the registered reduction (its C callback), None if none
        self._callbacks = []  # every C callback lra may hold: freed only when it cannot
        self._pending = threading.local()  # .exc: what the reducer raised, per calling thread
        self._lib = load_library()
        cfg = self.default_config(optimizer)
        for key, value in config.items():
            value = _config_value(key, value)
            try:
                setattr(cfg, key, value)
            except TypeError as exc:  # ctypes' message names no field
                raise TypeError(f"{key}: {exc}") from None
        self.config = cfg
        status = self._lib.lra_create(ctypes.byref(cfg), ctypes.byref(self._h))
        if status != OK:
            raise LraError(status, _decode(self._lib.lra_thread_last_error()))

    @staticmethod
    def default_config(optimizer="adam"):
        """An ``lra_config`` filled by ``lra_config_init`` for ``optimizer``."""
        if isinstance(optimizer, str):
            code = _named_value("optimizer", OPTIMIZERS, optimizer)
        else:
            code = _int_value("optimizer", ctypes.c_uint32, optimizer)
        cfg = Config()
        load_library().lra_config_init(ctypes.byref(cfg), code)
        return cfg

    # lifetime
    def close(self):
        """Destroys the handle (idempotent); later calls raise.

        Refused with ``LraError`` (``CALL_ORDER``) while a call on this
        object runs (another thread's, or the one whose reducer calls
        close()); the handle then stays usable.
        """
        # Only attributes of self: at interpreter shutdown __del__ may run
        # after this module's globals were cleared to None. (The refusal
        # below needs globals, but no call is in flight on an object the
        # garbage collector finalizes.)
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            h = self._h
            if not h:
                return
            if self._in_flight:
                raise LraError(
                    CALL_ORDER,
                    "close() in the middle of another call on this handle "
                    "(another thread's, or from inside its reduction callback); the handle stays open",
                )
            closed = type(h)()
            # No call between forgetting the handle and destroying it: a
            # Ctrl-C is raised as a call returns, and one raised here
            # would leak the handle.
            self._h = closed
            self._lib.lra_destroy(h)
        self._reducer = None  # lra no longer calls it
        self._callbacks = []

    def __del__(self):
        self.close()

    def __reduce__(self):
        # copy.copy would share the raw handle: closing one copy frees it
        # under the other (use after free, double lra_destroy).
        raise TypeError(
            "an lra.Optimizer owns a C handle and cannot be copied or pickled; "
            "use save_state()/load_state() (TorchOptimizer: state_dict()/load_state_dict())"
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, fn, *args, callback=False):
        """Runs the lra function ``fn(handle, *args)`` and raises what it failed with.

        The call is counted as in flight meanwhile: :meth:`close` refuses
        while the count is not zero, so no thread passes a freed handle to
        C, and a refused ``lra_destroy`` (silent in C) cannot leak the
        handle. The lock guards the count only, never the C call: calls
        release the GIL and may overlap (lra refuses the second with
        ``LRA_CALL_ORDER``). ``callback``: the call may run the reduction
        trampoline (see :class:`_InterruptDeferral`).

        Python raises a ``KeyboardInterrupt`` as a call returns or a
        function is entered. The count is therefore taken and given back
        inline, inside one ``try``, with no call between the ``finally``
        and the decrement (a context manager's ``__exit__`` is a function
        entry: a Ctrl-C raised there left the count up, and close()
        refused, for good).
        """
        counted = False
        token = None
        try:
            try:
                with self._lock:
                    h = self._h
                    if not h:
                        raise LraError(1, "the lra handle was closed")
                    self._in_flight += 1
                    counted = True
                if callback and self._reducer is not None:
                    token = _INTERRUPTS.enter()
                self._pending.exc = None
                status = fn(h, *args)
            finally:
                if counted:
                    with self._lock:
                        self._in_flight -= 1
            self._check(status)
        finally:
            _INTERRUPTS.leave(token)

    def _check(self, status):
        exc = getattr(self._pending, "exc", None)
        self._pending.exc = None
        if status == OK:
            return
        # The calling thread's message, not lra_last_error(h): a call
        # refused because another one runs on the handle (another
        # thread, or the reduction callback) leaves its reason only
        # there, and the handle's message belongs to the running call.
        err = LraError(status, _decode(self._lib.lra_thread_last_error()))
        if exc is None:
            raise err
        if isinstance(exc, Exception):
            raise err from exc
        # KeyboardInterrupt, SystemExit, ...: stop the program as asked,
        # now that lra has refused the call.
        if hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(f"lra: the call failed and changed nothing ({err})")
        raise exc

    # the iteration
    @staticmethod
    def _tensor_array(tensors):
        if isinstance(tensors, ctypes.Array) and tensors._type_ is Tensor:
            return tensors
        items = [t if isinstance(t, Tensor) else _tensor_from_tuple(i, t) for i, t in enumerate(tensors)]
        arr = (Tensor * len(items))(*items)
        # The array holds copies of the structs, not the Tensors that own the
        # arrays (numpy_tensor): with a generator nothing else references
        # them, and the memory was freed before lra read it.
        arr._keep = items
        return arr

    def step(self, tensors, loss, obs_var=0.0, stream=None, found_inf=None):
        """``lra_step`` / ``lra_step_ex``: the optimizer step with the current lr.

        ``tensors``: :class:`Tensor` structs (such as :func:`numpy_tensor`'s)
        or ``(param_ptr, grad_ptr, numel, dtype)`` tuples, the same layout at
        every step. ``stream``: a ``CUstream`` as an int (CUDA handles only).
        ``found_inf``: address of one f32 flag (host or device memory, like
        the tensors) or None.
        """
        arr = self._tensor_array(tensors)
        loss, obs_var = _number("loss", loss), _number("obs_var", obs_var)
        if found_inf is not None and not isinstance(found_inf, int):
            raise TypeError(
                "found_inf must be the flag's address as an int (numpy: arr.ctypes.data; "
                f"torch: t.data_ptr()) or None, not {type(found_inf).__name__}"
            )
        if found_inf is None:
            self._call(self._lib.lra_step, arr, len(arr), loss, obs_var, stream, callback=True)
        else:
            self._call(
                self._lib.lra_step_ex, arr, len(arr), loss, obs_var, found_inf, stream, callback=True
            )

    def report_reeval(self, loss_after):
        """``lra_report_reeval``: f+ on the SAME batch after the step; returns :class:`ReevalInfo`."""
        info = ReevalInfo()
        loss_after = _number("loss_after", loss_after)
        self._call(self._lib.lra_report_reeval, loss_after, ctypes.byref(info), callback=True)
        return info

    def should_reeval(self):
        """Whether the schedule wants the pending step re-evaluated."""
        out = ctypes.c_uint32()
        self._call(self._lib.lra_should_reeval, ctypes.byref(out))
        return bool(out.value)

    # getters / setters
    @property
    def lr(self):
        out = ctypes.c_double()
        self._call(self._lib.lra_get_lr, ctypes.byref(out))
        return out.value

    @lr.setter
    def lr(self, value):
        value = _number("lr", value)
        self._call(self._lib.lra_set_lr, value)

    @property
    def last_phi(self):
        out = ctypes.c_double()
        self._call(self._lib.lra_get_last_phi, ctypes.byref(out))
        return out.value

    @property
    def last_reeval(self):
        info = ReevalInfo()
        self._call(self._lib.lra_get_last_reeval, ctypes.byref(info))
        return info

    @property
    def counters(self):
        out = Counters()
        self._call(self._lib.lra_get_counters, ctypes.byref(out))
        return out

    # checkpoints
    def save_state(self):
        """A versioned checkpoint as ``bytes``."""
        size = ctypes.c_size_t()
        written = ctypes.c_size_t()
        self._call(self._lib.lra_state_size, ctypes.byref(size))
        buf = ctypes.create_string_buffer(max(size.value, 1))
        self._call(self._lib.lra_save_state, buf, size.value, ctypes.byref(written))
        return buf.raw[: written.value]

    def load_state(self, data):
        """Restores a checkpoint from :meth:`save_state` (same config and layout)."""
        if isinstance(data, int):  # bytes(5) is five zero bytes, not a checkpoint
            raise TypeError("load_state takes the bytes save_state returned, not an int")
        data = bytes(data)
        buf = ctypes.create_string_buffer(data, max(len(data), 1))
        self._call(self._lib.lra_load_state, buf, len(data))

    # distributed
    def set_reduction(self, reduce):
        """Registers ``reduce(values: list[float]) -> list[float]`` (the cross-rank sums), or None.

        ``reduce`` runs inside :meth:`step` and :meth:`report_reeval`. If it
        raises, or returns the wrong number of values, lra is told the
        reduction failed: the call changes nothing and raises
        ``LraError`` (status ``REDUCTION_FAILED``) whose ``__cause__`` is
        the reducer's exception, except for ``KeyboardInterrupt``,
        ``SystemExit`` and other non-``Exception`` exceptions, which are
        re-raised as they are (stopping the program, as asked). A Ctrl-C
        that arrives while lra computes is delivered the same way, at the
        next reduction or once the call returns. Not callable: ``TypeError``.
        """
        if reduce is None:
            self._call(self._lib.lra_set_reduction, REDUCE_FN(), None)
            self._reducer = None
            self._callbacks = []
            return
        if not callable(reduce):
            raise TypeError(f"the reduction must be callable or None, not {type(reduce).__name__}")
        pending = self._pending  # not self: a cycle through the C callback would delay __del__

        def trampoline(values, count, _user):
            # Nothing may unwind through C: ctypes would print the exception
            # and give lra an undefined status (0 reads as success).
            try:
                token = _INTERRUPTS.open()
                try:
                    sums = reduce([values[i] for i in range(count)])
                    if len(sums) != count:
                        raise ValueError(f"the reduction returned {len(sums)} values for {count}")
                    sums = [float(v) for v in sums]
                finally:
                    if token is not None:
                        _INTERRUPTS.safe = token  # inline: see _InterruptDeferral.open
                for i, v in enumerate(sums):
                    values[i] = v
                return 0
            except BaseException as exc:  # noqa: BLE001 -- re-raised by _check after the C call
                pending.exc = exc
                return 1

        fn = REDUCE_FN(trampoline)
        # Alive before lra may hold it: a Ctrl-C raised as the C call
        # returns would otherwise free the callback that lra then calls.
        self._callbacks.append(fn)
        try:
            self._call(self._lib.lra_set_reduction, fn, None)
        except LraError:
            self._callbacks.remove(fn)  # refused: lra kept what it had
            raise
        self._reducer = fn
        self._callbacks = [fn]


# --- dense layouts (the numpy helper and the torch adapter) -----------------


def _memory_order(shape, strides):
    """The strides of the dimensions longer than 1 (None for the others).

    Two arrays of one shape and element size with the same memory order put
    every element at the same offset from their data pointers: what lra
    needs of a parameter and its gradient, which it pairs by offset.
    """
    return tuple(st if sz != 1 else None for sz, st in zip(shape, strides))


def _covers_memory_densely(shape, strides, unit=1):
    """Whether the elements fill consecutive slots, each once.

    ``unit`` is one element's size in the strides' unit: 1 for torch's
    element strides, the item size for numpy's byte strides. True for
    contiguous arrays and for permuted dense layouts (Fortran order,
    ``channels_last``): an elementwise update may then walk the memory in
    order. False for views that skip or repeat memory (slices, expand,
    broadcasts) or run backwards (negative strides).
    """
    expected = unit
    for stride, size in sorted((st, sz) for sz, st in zip(shape, strides) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# --- numpy arrays -----------------------------------------------------------


def _numpy_dtype_code(np, what, dtype):
    if dtype == np.float32:
        return DTYPE_F32
    if dtype == np.float16:
        return DTYPE_F16
    # numpy has no bfloat16. ml_dtypes adds one as a custom dtype; its name
    # and size are all that mark it (the bits are the upper half of an f32).
    if dtype.name == "bfloat16" and dtype.itemsize == 2 and dtype.isnative:
        return DTYPE_BF16
    if dtype.kind == "f" and not dtype.isnative:
        raise TypeError(
            f"{what} has dtype {dtype.str} ({dtype.name} in non-native byte order); lra reads "
            "native-order floats: convert it once, a.astype(a.dtype.newbyteorder('='))"
        )
    raise TypeError(
        f"{what} has dtype {dtype}; lra supports float32, float16 and bfloat16 (numpy has no "
        "bfloat16 of its own: ml_dtypes.bfloat16 arrays are accepted)"
    )


def numpy_tensor(param, grad):
    """A :class:`Tensor` for the numpy array ``param`` and its gradient ``grad``.

    The Tensor points into the two arrays themselves (no copy) and holds
    references to them, so their memory lives at least as long as the
    Tensor does: pass the Tensor objects (in a list) to
    :meth:`Optimizer.step`. Rewrite the gradient in place
    (``np.matmul(..., out=grad)``, ``grad[...] = ...``) and one Tensor
    serves every step; a new gradient array needs a new Tensor. A ctypes
    array of Tensors built by hand copies the structs but not the
    references: keep the Tensors (or the arrays) alive while it is used.

    Checked here, before lra sees anything (numpy is imported only now):

    * ``TypeError``: either is not a ``numpy.ndarray`` (or is a masked
      array), or has a dtype other than native-order float32, float16 or
      bfloat16 (``ml_dtypes.bfloat16``: numpy has none).
    * ``ValueError``: ``grad``'s dtype or shape differs from ``param``'s;
      ``param`` is read-only, or an element of either is misaligned;
      ``param`` is a view that does not cover its memory densely (``a[::2]``,
      negative strides; C, Fortran and other permuted dense orders are
      fine); ``grad`` is laid out in another memory order than ``param``
      (lra pairs elements by memory offset; copy it into ``param``'s layout
      first: ``g = np.empty_like(param); g[...] = grad``); the two share
      memory.

    Zero-size arrays are accepted (lra reads no memory for them). Whether
    Tensors of one step overlap each other, and whether the handle is a
    host handle, lra checks at the step (``LraError``, nothing changed).
    """
    import numpy as np

    for what, a in (("param", param), ("grad", grad)):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{what} must be a numpy.ndarray, not {type(a).__name__}")
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(
                f"{what} is a masked array: lra would read and write the masked elements "
                "too; pass its .data"
            )
    code = _numpy_dtype_code(np, "param", param.dtype)
    _numpy_dtype_code(np, "grad", grad.dtype)
    if grad.dtype != param.dtype:
        raise ValueError(f"grad has dtype {grad.dtype}, param {param.dtype}: they must be the same")
    if grad.shape != param.shape:
        raise ValueError(
            f"grad has shape {grad.shape}, param {param.shape}: they must be the same "
            "(not only the same size)"
        )
    if not param.flags.writeable:
        raise ValueError("param is read-only (flags.writeable is False); lra updates parameters in place")
    for what, a in (("param", param), ("grad", grad)):
        if not a.flags.aligned:
            raise ValueError(
                f"{what} is not aligned for {a.dtype} (data at {a.ctypes.data:#x}, strides "
                f"{a.strides}); lra reads and writes whole aligned elements"
            )
    if param.size > 0:
        if not _covers_memory_densely(param.shape, param.strides, param.itemsize):
            raise ValueError(
                f"param is a view with strides {param.strides} (bytes) that does not cover its "
                "memory densely; lra updates parameters in place, so it cannot work on a "
                "contiguous copy: pass the array that owns the memory"
            )
        if _memory_order(grad.shape, grad.strides) != _memory_order(param.shape, param.strides):
            raise ValueError(
                f"grad has strides {grad.strides}, param {param.strides} (bytes): lra pairs "
                "elements by memory offset, so grad must be laid out like param; copy it into "
                "param's layout first (g = np.empty_like(param); g[...] = grad)"
            )
        # Both dense now, so sharing their bounds means sharing elements.
        if np.may_share_memory(param, grad):
            raise ValueError(
                "param and grad share memory; lra would overwrite the gradient while reading it"
            )
    tensor = Tensor(param.ctypes.data, grad.ctypes.data, param.size, code)
    tensor._arrays = (param, grad)  # what the pointers point into: alive while the Tensor is
    return tensor


# --- torch adapter ----------------------------------------------------------


def _torch_dtype_code(torch, dtype, name):
    codes = {torch.float32: DTYPE_F32, torch.float16: DTYPE_F16, torch.bfloat16: DTYPE_BF16}
    if dtype not in codes:
        raise TypeError(f"{name} is {dtype}: lra supports float32, float16 and bfloat16 parameters")
    return codes[dtype]


def _torch_flag(t, name):
    """``t.<name>()``, False where this torch lacks the method (``is_neg``/
    ``is_conj`` came in 1.10, ``_is_zerotensor`` in 1.11): a torch without it
    cannot make such tensors."""
    method = getattr(t, name, None)
    return bool(method()) if method is not None else False


def _torch_unsupported(torch, p):
    """What makes parameter ``p`` impossible to update in place through its
    data pointer, or None (the rules of lra_torch.hpp's ``unsupported()``)."""
    if p.layout != torch.strided:
        return f"has layout {p.layout}: lra updates dense (strided) tensors only"
    if _torch_flag(p, "is_neg") or _torch_flag(p, "is_conj"):
        return ("is a lazily negated or conjugated view (_neg_view): its memory holds other "
                "values than the tensor; resolve it (resolve_neg()) before making the optimizer")
    if _torch_flag(p, "_is_zerotensor"):
        return "is a ZeroTensor, which has no memory to update"
    # After a step the version counter is bumped, which an inference tensor
    # has not: refused before anything is updated (also one made so after
    # construction, e.g. model.to(...) under inference_mode()).
    if _torch_flag(p, "is_inference"):
        return ("is an inference tensor (made under torch.inference_mode()): it cannot be "
                "updated in place outside inference mode; create the model outside it")
    return None


def _not_dense(name, p):
    return (f"{name} is a view with strides {p.stride()} that does not cover its memory "
            "densely; lra updates parameters in place, so it cannot work on a contiguous copy")


def _bytes_tensor(torch, raw):
    """`raw` as a 1-D uint8 CPU tensor (torch.frombuffer from torch 1.10)."""
    if not raw:
        return torch.empty(0, dtype=torch.uint8)
    if hasattr(torch, "frombuffer"):
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return torch.tensor(list(raw), dtype=torch.uint8)


class _ParamGroup(collections.abc.MutableMapping):
    """The one parameter group of a :class:`TorchOptimizer`: ``"params"``,
    and ``"lr"``, η itself (read: lra's current η; written: ``lra_set_lr``,
    from the next step). Other keys are refused: every other
    hyper-parameter is fixed when the handle is created."""

    def __init__(self, params, handle):
        # The Optimizer, not the TorchOptimizer: no reference cycle, so the
        # handle is freed as soon as the TorchOptimizer is dropped.
        self._params = params
        self._handle = handle

    def __getitem__(self, key):
        if key == "params":
            # A tuple: appending to the list (torch.optim habit) would change
            # the layout lra fixed; lra has no add_param_group.
            return tuple(self._params)
        if key == "lr":
            return self._handle.lr
        raise KeyError(key)

    def __setitem__(self, key, value):
        if key == "lr":
            self._handle.lr = value
            return
        raise KeyError(
            f"lra.TorchOptimizer's parameter group takes only 'lr' (η, from the next step); "
            f"{key!r} is fixed when the optimizer is created"
        )

    def __delitem__(self, key):
        raise KeyError(f"the parameter group's {key!r} cannot be removed")

    def __iter__(self):
        return iter(("params", "lr"))

    def __len__(self):
        return 2

    def __contains__(self, key):
        return key in ("params", "lr")

    def __reduce__(self):
        # A copy (copy.deepcopy, pickle, torch.save of param_groups) is a
        # snapshot: a plain dict; the handle itself cannot be copied.
        return (dict, (dict(self),))

    def __repr__(self):
        try:
            lr = repr(self._handle.lr)
        except LraError:
            lr = "<handle closed>"
        return f"{{'params': [{len(self._params)} tensors], 'lr': {lr}}}"


class TorchOptimizer:
    """lra over a list of ``torch`` parameters (all on one device).

    Parameters without ``requires_grad`` are left out (for good: the tensor
    layout is fixed by the first step, so unfreezing them later needs a new
    optimizer). At every :meth:`step` the pointers of the parameters and of
    their CURRENT ``.grad`` tensors are gathered again (autograd may
    reallocate gradients); every parameter must have a gradient then
    (``zero_grad(set_to_none=False)`` or a loss that reaches every
    parameter). Parameters are updated in place, so each must be a strided
    (not sparse) tensor without a lazy negation bit (``_neg_view``), cover
    its memory densely (contiguous, or a permuted dense layout such as
    ``channels_last``) and keep its memory layout from the first step on;
    gradients of another layout (transposed, expanded), lazily negated ones
    and ZeroTensors are copied into the parameter's layout for the step.
    CUDA parameters use a CUDA handle on the parameters' device and torch's
    current stream; ``device`` and ``device_ordinal`` follow the parameters.
    """

    def __init__(self, params, optimizer="adam", **config):
        import torch

        self._torch = torch
        if isinstance(params, torch.Tensor):
            raise TypeError(
                "params must be an iterable of tensors such as model.parameters(), not one tensor"
            )
        params = list(params)
        for i, p in enumerate(params):
            if isinstance(p, dict):
                raise TypeError(
                    "parameter groups (dicts) are not supported: one lra handle adapts one "
                    "learning rate; make one TorchOptimizer per group"
                )
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameter {i} is a {type(p).__name__}, not a torch.Tensor")
        # Messages name a parameter by its position in `params`, frozen
        # ones included (the position the caller can look up).
        self._positions = [i for i, p in enumerate(params) if p.requires_grad]
        self.params = [params[i] for i in self._positions]
        if not self.params:
            raise ValueError("no parameters that require gradients")
        self.device = self.params[0].device
        first_index = {}
        for i, p in zip(self._positions, self.params):
            if not p.is_leaf:
                raise ValueError(
                    f"parameter {i} is not a leaf tensor (it is the result of an operation): "
                    "autograd never fills its .grad; pass the leaf it was computed from"
                )
            if id(p) in first_index:
                raise ValueError(f"parameter {i} is parameter {first_index[id(p)]} again")
            first_index[id(p)] = i
            if p.device != self.device:
                raise ValueError(
                    f"parameter {i} is on {p.device}, parameter {self._positions[0]} on "
                    f"{self.device}: one TorchOptimizer per device"
                )
            _torch_dtype_code(torch, p.dtype, f"parameter {i}")
            why = _torch_unsupported(torch, p)
            if why is not None:
                raise ValueError(f"parameter {i} {why}")
            # Refused here too, not only at the first step (after set_data).
            if p.numel() > 0 and not _covers_memory_densely(p.shape, p.stride()):
                raise ValueError(_not_dense(f"parameter {i} {tuple(p.shape)}", p))
        if self.device.type == "cuda":
            placement = {"device": DEVICE_CUDA, "device_ordinal": self.device.index or 0}
        elif self.device.type == "cpu":
            placement = {"device": DEVICE_HOST}
        else:
            raise ValueError(f"unsupported device {self.device}")
        # The handle must be where the parameters are: a host handle given
        # device pointers (or the reverse) would dereference foreign memory.
        for key, want in placement.items():
            if key in config and _config_value(key, config[key]) != want:
                raise ValueError(
                    f"{key}={config[key]!r} contradicts the parameters' device {self.device} "
                    "(the handle's device follows the parameters; leave it out)"
                )
        config.update(placement)
        self.lra = Optimizer(optimizer, **config)
        self._memory_orders = None  # fixed by the first successful step
        self._param_groups = [_ParamGroup(self.params, self.lra)]

    @property
    def param_groups(self):
        """One group holding every parameter (what ``GradScaler.unscale_``
        reads) and ``"lr"``, lra's η: ``opt.param_groups[0]["lr"] = x`` sets
        η from the next step, as in ``torch.optim``."""
        return self._param_groups

    def zero_grad(self, set_to_none=True):
        """Clears the gradients like ``torch.optim.Optimizer.zero_grad``."""
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def _gather(self):
        """The ``lra_tensor`` array for this step, the tensors it points into
        (keep them alive until the C call returns: some are copies) and the
        parameters' memory orders."""
        torch = self._torch
        if len(self.params) != len(self._positions):
            raise ValueError(
                f"opt.params holds {len(self.params)} tensors, {len(self._positions)} when the "
                "optimizer was made: the parameter list is fixed (lra keeps state per position); "
                "make a new TorchOptimizer for another set of parameters"
            )
        arr = (Tensor * len(self.params))()
        keep = []
        orders = []
        for i, p in enumerate(self.params):
            name = f"parameter {self._positions[i]} {tuple(p.shape)}"
            if p.device != self.device:
                raise ValueError(
                    f"{name} is now on {p.device}, this optimizer's handle on {self.device}: "
                    "make the TorchOptimizer after moving the model"
                )
            why = _torch_unsupported(torch, p)
            if why is not None:  # it became so after construction (p.data = ...)
                raise ValueError(f"{name} {why}")
            g = p.grad
            if g is None:
                raise ValueError(f"{name} has no gradient (backward() not called, or it does "
                                 "not reach this parameter)")
            if g.layout != torch.strided:
                raise ValueError(f"{name} has a {g.layout} gradient; lra needs dense gradients")
            if g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
                raise ValueError(
                    f"{name}: gradient {g.dtype}/{g.device}/{tuple(g.shape)} differs "
                    f"from the parameter {p.dtype}/{p.device}/{tuple(p.shape)}"
                )
            order = _memory_order(p.shape, p.stride())
            orders.append(order)
            if p.numel() > 0:
                if not _covers_memory_densely(p.shape, p.stride()):
                    raise ValueError(_not_dense(name, p))
                if self._memory_orders is not None and self._memory_orders[i] != order:
                    raise ValueError(
                        f"{name} changed its memory layout (strides now {p.stride()}) since "
                        "the first step; lra's optimizer state follows the memory order"
                    )
                # A lazily negated gradient's memory holds -g, a ZeroTensor
                # has none: the copy materialises both.
                if (_memory_order(g.shape, g.stride()) != order or _torch_flag(g, "is_neg")
                        or _torch_flag(g, "is_conj") or _torch_flag(g, "_is_zerotensor")):
                    with torch.no_grad():  # a create_graph=True gradient needs no graph here
                        g = torch.empty_strided(
                            p.shape, p.stride(), dtype=p.dtype, device=p.device
                        ).copy_(g)
            keep.append(g)
            code = _torch_dtype_code(torch, p.dtype, name)
            arr[i] = Tensor(p.data_ptr(), g.data_ptr(), p.numel(), code)
        return arr, keep, orders

    def _stream(self):
        if self.device.type != "cuda":
            return None
        return self._torch.cuda.current_stream(self.device).cuda_stream or None

    @staticmethod
    def _value(x, what="loss"):
        if hasattr(x, "detach"):
            if x.numel() != 1:
                raise ValueError(
                    f"the {what} must be one element, not {x.numel()} (reduce it, e.g. with .mean())"
                )
            return float(x.detach().item())
        return _number(what, x)

    def step(self, loss, obs_var=0.0, found_inf=None):
        """The optimizer step with the current lr; ``loss`` = f_i on this batch (tensor or float).

        ``found_inf``: an optional one-element float32 tensor on the
        parameters' device (e.g. from AMP); non-zero skips the step.
        """
        loss = self._value(loss)
        flag = None
        if found_inf is not None:
            if not isinstance(found_inf, self._torch.Tensor):
                raise TypeError(
                    f"found_inf must be a torch.Tensor (one float32 element), not "
                    f"{type(found_inf).__name__}"
                )
            if (found_inf.dtype != self._torch.float32 or found_inf.device != self.device
                    or found_inf.numel() != 1 or found_inf.layout != self._torch.strided):
                raise ValueError("found_inf must be one float32 element on the parameters' device")
            flag = found_inf.data_ptr()
        arr, keep, orders = self._gather()
        try:
            self.lra.step(arr, loss, obs_var, self._stream(), flag)
        except LraError as e:
            # lra counts the tensors it was given; name the caller's positions
            # too (frozen parameters are not passed), as the C++ adapter does.
            e.message = re.sub(
                r"tensors\[(\d+)\]",
                lambda m: f"{m.group(0)} (parameter {self._positions[int(m.group(1))]})"
                if int(m.group(1)) < len(self._positions) else m.group(0),
                e.message,
            )
            e.args = (e.status, e.message)
            raise
        del keep  # the C call has returned (on CUDA: queued on torch's current stream)
        self._memory_orders = orders
        self._mark_params_modified()
        self._clear_autocast_cache()

    def _clear_autocast_cache(self):
        """Inside an autocast region, forward passes reuse cached low-precision
        copies of the parameters: a re-evaluation in the same region after a
        step would see the weights before it (f+ = f_i: lr halves every
        step), and the next forward after a re-evaluation under no_grad would
        reuse copies without a graph (backward fails). Cleared after both."""
        clear = getattr(self._torch, "clear_autocast_cache", None)
        if clear is not None:
            clear()

    def _mark_params_modified(self):
        """Tells autograd that the parameters changed in place, as torch.optim's
        in-place updates do: lra wrote through raw pointers, so a graph that
        saved a parameter would otherwise backpropagate through the new values
        without the "modified by an inplace operation" error."""
        torch = self._torch
        increment = getattr(getattr(torch.autograd, "graph", None), "increment_version", None)
        for p in self.params:
            if increment is not None:
                increment(p)
            else:  # torch < 2.1: an in-place op on an empty view bumps the shared counter
                p.detach().unsqueeze(0)[:0].zero_()

    def report_reeval(self, loss_after):
        """f+ = the loss on the SAME batch after :meth:`step`; adapts lr; returns :class:`ReevalInfo`."""
        return self.lra.report_reeval(self._value(loss_after, "loss after the step"))

    def reeval(self, closure, force=False):
        """Runs ``closure()`` (the loss on the same batch) under ``torch.no_grad`` and reports it.

        Skipped (returns None) when the re-evaluation schedule does not want
        this step re-evaluated, unless ``force``.
        """
        if not force and not self.lra.should_reeval():
            return None
        try:
            with self._torch.no_grad():
                loss_after = closure()
        finally:
            self._clear_autocast_cache()
        return self.report_reeval(loss_after)

    @property
    def lr(self):
        return self.lra.lr

    @lr.setter
    def lr(self, value):
        self.lra.lr = value

    def state_dict(self):
        """The handle's checkpoint (``"lra_state"``, a 1-D uint8 CPU tensor, so
        that ``torch.load(weights_only=True)`` takes the dict on every torch
        version), the parameter shapes and dtypes and, when the handle
        holds optimizer state, the parameters' memory layout (``None`` before
        any step). After a load that could not check the layout (a bare
        ``self.lra.load_state``, a dict without ``"memory_orders"``) the
        layout recorded is the parameters' current one, which the next step
        would fix."""
        orders = self._memory_orders
        if orders is None and self.lra.counters.steps > 0:
            orders = [_memory_order(p.shape, p.stride()) for p in self.params]
        raw = self.lra.save_state()
        torch = self._torch
        return {
            # bytes pickle as _codecs.encode, which torch 1.13's
            # weights_only unpickler refuses; a tensor loads everywhere.
            "lra_state": _bytes_tensor(torch, raw),
            "shapes": [tuple(p.shape) for p in self.params],
            "dtypes": [str(p.dtype) for p in self.params],
            "memory_orders": None if orders is None else [list(order) for order in orders],
        }

    def load_state_dict(self, state):
        """Restores :meth:`state_dict` output; refuses one saved for other
        parameter shapes or another memory layout, and changes nothing then.

        The optimizer state follows memory order, so a checkpoint of a
        contiguous model loaded into a ``channels_last`` one (or the reverse)
        would give each element another element's state: convert the model
        to the saved layout first. After loading, that layout is fixed as if
        this optimizer had taken the saved steps.
        """
        if not isinstance(state, dict) or "lra_state" not in state:
            raise ValueError("not a state_dict of lra.TorchOptimizer (no 'lra_state' entry)")
        shapes = [tuple(p.shape) for p in self.params]
        if "shapes" in state and [tuple(s) for s in state["shapes"]] != shapes:
            raise ValueError(
                f"the state_dict was saved for parameter shapes {state['shapes']}, "
                f"this optimizer has {shapes}"
            )
        # Refused here, not at the next step: a fresh handle takes any layout
        # from a checkpoint, and every step would then fail against it.
        dtypes = [str(p.dtype) for p in self.params]
        if "dtypes" in state and list(state["dtypes"]) != dtypes:
            raise ValueError(
                f"the state_dict was saved for parameter dtypes {list(state['dtypes'])}, "
                f"this optimizer has {dtypes}"
            )
        saved_orders = state.get("memory_orders")
        if saved_orders is not None:
            if not (isinstance(saved_orders, (list, tuple))
                    and all(isinstance(o, (list, tuple)) for o in saved_orders)):
                raise ValueError(
                    "the state_dict's 'memory_orders' is not a list of stride lists "
                    f"({type(saved_orders).__name__})"
                )
            if len(saved_orders) != len(self.params):
                raise ValueError(
                    f"the state_dict holds memory layouts of {len(saved_orders)} parameters, "
                    f"this optimizer has {len(self.params)}"
                )
            saved_orders = [tuple(order) for order in saved_orders]
            for i, (p, order) in enumerate(zip(self.params, saved_orders)):
                if p.numel() > 0 and _memory_order(p.shape, p.stride()) != order:
                    raise ValueError(
                        f"parameter {self._positions[i]} {tuple(p.shape)} was saved in another memory layout "
                        f"(strides {order}, None for dimensions of size 1) than it has now "
                        f"(strides {p.stride()}): lra's optimizer state follows memory order; "
                        "give the model its saved layout (e.g. "
                        "model.to(memory_format=torch.channels_last)) before loading"
                    )
        self.lra.load_state(self._checkpoint_bytes(state["lra_state"]))
        if saved_orders is None and self.lra.counters.steps > 0:
            # Optimizer state of an unrecorded layout (a dict of an earlier
            # version): the parameters' current layout is the one it is
            # applied in from now on, as if the first step here fixed it.
            saved_orders = [_memory_order(p.shape, p.stride()) for p in self.params]
        if saved_orders is not None:
            self._memory_orders = saved_orders

    def _checkpoint_bytes(self, saved):
        """The checkpoint of a state dict: a uint8 tensor, or the ``bytes``
        that dicts of earlier versions hold."""
        if isinstance(saved, (bytes, bytearray, memoryview)):
            return bytes(saved)
        torch = self._torch
        if not isinstance(saved, torch.Tensor) or saved.dtype != torch.uint8 or saved.dim() != 1:
            what = (f"a {saved.dtype} tensor of {saved.dim()} dimensions"
                    if isinstance(saved, torch.Tensor) else f"a {type(saved).__name__}")
            raise ValueError(
                f"the state_dict's 'lra_state' is {what}, not the 1-D uint8 tensor "
                "(or bytes) that state_dict() writes"
            )
        saved = saved.detach().to("cpu").contiguous()
        return ctypes.string_at(saved.data_ptr(), saved.numel()) if saved.numel() else b""

    def close(self):
        self.lra.close()

    def __reduce__(self):
        # copy.copy shared the handle (closing the copy closed the original).
        raise TypeError(
            "an lra.TorchOptimizer owns a C handle and cannot be copied or pickled; "
            "use state_dict()/load_state_dict()"
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
