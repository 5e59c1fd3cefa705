"""Every op of l2m-kernels, declared once.

One :class:`OpDecl` per public op holds what the rest of the package derives from it:

- its name and schema (the arguments with their types, defaults, shapes and limits; the outputs):
  the op's ``torch.ops.l2m.<name>`` custom op is registered with :attr:`OpDecl.schema`;
- which backends serve it, the size limits each one has and the compiled entry point it needs:
  :mod:`l2m_kernels.backends` builds its tables from :data:`OPS`;
- the cases ``l2m-check`` runs (fixed edge cases and a generator of random shapes, with a label);
- the benchmark that times it and that benchmark's shapes (``l2m-bench``);
- the module holding its Triton kernels, whose production configurations the Triton compile check
  compiles.

``l2m-check``, ``l2m-bench``, the fuzz tests, the Triton compile check and the docs test iterate over
:data:`OPS` instead of listing ops by hand. Plain data and the standard library only, so that
:mod:`l2m_kernels.backends` can import it before any op (the ops import the backends).

Adding an op: its folder under ``l2m_kernels/ops/`` and one declaration here (see
``docs/adding-an-op.md``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Mapping

# The backends every op may name, in the order the tables list them.
BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")


@dataclass(frozen=True)
class Arg:
    """One argument of an op's schema.

    ``type`` and ``default`` are written as in a ``torch.library`` schema (``"Tensor?"``,
    ``"SymInt"``, ``'"auto"'``); ``shape`` and ``doc`` are for people (the docs and error texts).
    """

    name: str
    type: str
    shape: str = ""
    doc: str = ""
    default: str | None = None

    def schema(self) -> str:
        text = f"{self.type} {self.name}"
        return text if self.default is None else f"{text}={self.default}"


@dataclass(frozen=True)
class Output:
    name: str
    shape: str
    dtype: str


@dataclass(frozen=True)
class Serving:
    """How a backend serves an op: the largest sizes it takes (``{size name: largest value}``,
    checked against the sizes a call passes to ``select_backend``) and the function its compiled
    extension must have (an extension built from older sources lacks newer ones)."""

    size_limits: Mapping[str, int] = field(default_factory=dict)
    entry: str | None = None


@dataclass(frozen=True)
class Cases:
    """The shapes ``l2m-check`` runs: ``edge`` (the first two also with ``--quick``) and random
    shapes from ``random(rng)``; ``label(params)`` describes one in the table. ``wide``: larger
    shapes that reach every vector width and tail of the CPU kernels (each instruction-set variant
    is checked on them). Each case is a dict in the parameter names of the op's builder in
    :mod:`l2m_kernels.fuzz`, which builds and judges it (``fuzz.declared_case``)."""

    edge: tuple
    random: Callable[[random.Random], dict]
    label: Callable[[dict], str]
    wide: tuple = ()


@dataclass(frozen=True)
class Bench:
    """The ``l2m-bench`` benchmark (module ``l2m_kernels.bench.<module>``) that times the op, and
    its shapes: ``shapes`` (name -> sizes; on CUDA the ``-gpu`` variant, see
    ``l2m_kernels.bench._common.spec_shapes``) and ``tiny`` (the tests' shapes)."""

    module: str
    shapes: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    tiny: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class OpDecl:
    name: str                       # the public function l2m_kernels.<name> and torch.ops.l2m.<name>
    package: str                    # its folder, l2m_kernels/ops/<package>
    summary: str                    # what it computes, one line
    args: tuple[Arg, ...]
    outputs: tuple[Output, ...]
    backends: Mapping[str, Serving]
    cases: Cases
    bench: Bench
    reference: str                  # the reference function in l2m_kernels.ops.<package>.reference
    # Automatic backend order per device type where it differs from backends.AUTO_ORDER.
    auto_order: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def qualname(self) -> str:
        return f"l2m::{self.name}"

    @property
    def schema(self) -> str:
        """The ``torch.library`` schema, without the name."""
        returns = ", ".join("Tensor" for _ in self.outputs)
        if len(self.outputs) != 1:
            returns = f"({returns})"
        return "(" + ", ".join(arg.schema() for arg in self.args) + ") -> " + returns

    @property
    def triton_module(self) -> str | None:
        """The module of its Triton kernels (with their ``COMPILE_CONFIGS``), if triton serves it."""
        return f"l2m_kernels.ops.{self.package}.triton" if "triton" in self.backends else None

    def arg(self, name: str) -> Arg:
        for arg in self.args:
            if arg.name == name:
                return arg
        raise KeyError(f"{self.name} has no argument {name!r}")


def _odd(rng: random.Random, low: int, high: int) -> int:
    return rng.randrange(low | 1, high + 1, 2)


def _valid_lens(rng: random.Random, B: int, N: int):
    return None if rng.random() < 0.5 else [rng.randint(0, N) for _ in range(B)]


def _compact(text: str) -> str:
    return text.replace(", ", ",")


_BACKEND = Arg("backend", "str", "", 'None or "auto" (automatic), "reference", "cpu", "triton" or "cuda"',
               '"auto"')
_DETERMINISTIC = Arg("deterministic", "bool", "",
                     "bitwise-reproducible gradients (also under torch.use_deterministic_algorithms)",
                     "False")


def _served(entry: str, cuda_limits: Mapping[str, int] | None = None,
            triton_limits: Mapping[str, int] | None = None, cuda_entry: str | None = None) -> dict[str, Serving]:
    """``cuda_entry``: the CUDA extension's newest function the op needs, where it differs."""
    return {"reference": Serving(),
            "cpu": Serving(entry=entry),
            "triton": Serving(size_limits=dict(triton_limits or {})),
            "cuda": Serving(size_limits=dict(cuda_limits or {}), entry=cuda_entry or entry)}


# ------------------------------------------------------------------------------------------------
# topk_memory_read
# ------------------------------------------------------------------------------------------------

def topk_case(B, H, Hm, T, N, Dk, Dv, k, shared=False, valid_len=None):
    return dict(B=B, H=H, Hm=Hm, T=T, N=N, Dk=Dk, Dv=Dv, k=k, shared=shared, valid_len=valid_len)


def _topk_random(rng: random.Random) -> dict:
    B, Hm = rng.randint(1, 3), rng.randint(1, 2)
    N = rng.randint(2, 200)
    valid = _valid_lens(rng, B, N)
    return topk_case(B, Hm * rng.choice([1, 2, 3]), Hm, _odd(rng, 1, 21), N, rng.choice([3, 8, 16, 31, 64]),
                 rng.choice([1, 5, 16, 33]), rng.randint(1, min(N, 40)), shared=rng.random() < 0.5,
                 valid_len=valid)


def _topk_label(p: dict) -> str:
    return _compact(f"B{p['B']} H{p['H']}/{p['Hm']} T{p['T']} N{p['N']} Dk{p['Dk']} Dv{p['Dv']} k{p['k']}"
                    + (" shared" if p["shared"] else "") + (f" valid{p['valid_len']}" if p["valid_len"] else ""))


# The cuda top-k read keeps a head's query and key rows in shared memory.
_TOPK_CUDA_LIMITS = {"Dk": 256, "Dv": 256, "N": 2 ** 31, "rows": 2 ** 31 - 1}

TOPK_MEMORY_READ = OpDecl(
    name="topk_memory_read",
    package="topk_read",
    summary="s = scale·q·keysᵀ; the k best slots I (ties: smaller slot); out = Σ_{i∈I} softmax(s_I)_i·values_i",
    args=(
        Arg("q", "Tensor", "(B, H, T, Dk)", "queries, floating"),
        Arg("keys", "Tensor", "(B, Hm, N, Dk) or shared (Hm, N, Dk)", "memory keys, H % Hm == 0, q's dtype"),
        Arg("values", "Tensor", "(B, Hm, N, Dv) or (Hm, N, Dv)", "memory values, keys' leading shape"),
        Arg("k", "SymInt", "", "slots read per query, 1 <= k <= min(N, 256)"),
        Arg("scale", "float?", "", "score scale, default Dk ** -0.5", "None"),
        Arg("valid_len", "Tensor?", "(B,)", "int32/int64, 0 <= valid_len[b] <= N: slots n >= valid_len[b] "
            "do not exist", "None"),
        _DETERMINISTIC,
        _BACKEND,
    ),
    outputs=(Output("out", "(B, H, T, Dv)", "input dtype"), Output("indices", "(B, H, T, k)", "int64"),
             Output("weights", "(B, H, T, k)", "float32 (float64)"), Output("lse", "(B, H, T)", "float32 (float64)")),
    backends=_served("topk_read_fwd", cuda_limits=_TOPK_CUDA_LIMITS, cuda_entry="topk_read_chunk_max"),
    cases=Cases(
        edge=(
            topk_case(2, 4, 2, 9, 129, 16, 8, 8, valid_len=[129, 40]),          # grouped heads, valid_len
            topk_case(2, 4, 1, 5, 64, 8, 63, 64, shared=True, valid_len=[64, 10]),  # k = N, valid_len < k, shared
            topk_case(1, 1, 1, 7, 63, 7, 5, 3),                                  # odd sizes
            topk_case(3, 2, 2, 6, 300, 32, 16, 256, shared=True, valid_len=[300, 0, 7]),  # k = 256, empty memory
        ),
        random=_topk_random, label=_topk_label,
        wide=(topk_case(2, 4, 2, 70, 700, 64, 40, 32, valid_len=[700, 333]),)),
    bench=Bench("topk_read",
                shapes={"read-cpu": dict(B=1, H=1, Hm=1, T=4096, N=65536, Dk=64, Dv=64, k=32),
                        "read-heads": dict(B=2, H=8, Hm=8, T=512, N=16384, Dk=64, Dv=64, k=32)},
                tiny={"read-tiny": dict(B=1, H=2, Hm=1, T=32, N=256, Dk=16, Dv=16, k=4)}),
    reference="topk_memory_read_ref",
)


# ------------------------------------------------------------------------------------------------
# product_key_read
# ------------------------------------------------------------------------------------------------

def pk_case(B, H, T, Dk, n_sub, Dv, k, k_sub, sum_heads=False, sparse_grad=False):
    return dict(B=B, H=H, T=T, half=Dk // 2, n_sub=n_sub, Dv=Dv, k=k, k_sub=k_sub, pass_k_sub=True,
                sum_heads=sum_heads, sparse_grad=sparse_grad)


def _pk_random(rng: random.Random) -> dict:
    n_sub = rng.randint(2, 20)
    k_sub = rng.randint(1, min(n_sub, 12))
    return pk_case(rng.randint(1, 2), rng.randint(1, 3), _odd(rng, 1, 21), rng.choice([2, 6, 14, 32]), n_sub,
               rng.choice([1, 7, 16, 33]), rng.randint(1, k_sub * k_sub), k_sub,
               sum_heads=rng.random() < 0.5, sparse_grad=rng.random() < 0.5)


def _pk_label(p: dict) -> str:
    return (f"B{p['B']} H{p['H']} T{p['T']} Dk{2 * p['half']} n_sub{p['n_sub']} Dv{p['Dv']} k{p['k']}"
            f" k_sub{p['k_sub']}" + (" sum_heads" if p["sum_heads"] else "")
            + (" sparse_grad" if p["sparse_grad"] else ""))


PRODUCT_KEY_READ = OpDecl(
    name="product_key_read",
    package="product_key",
    summary="top-k_sub of each half's scores; slot (i, j) -> i·n_sub + j scored s1_i + s2_j; "
            "then a softmax read of the k best candidates",
    args=(
        Arg("q", "Tensor", "(B, H, T, Dk)", "queries, Dk even"),
        Arg("subkeys", "Tensor", "(H, 2, n_sub, Dk // 2)", "sub-keys of the two halves per head, q's dtype"),
        Arg("values", "Tensor", "(n_sub ** 2, Dv)", "slot values shared by all heads"),
        Arg("k", "SymInt", "", "slots read per query and head, 1 <= k <= k_sub ** 2"),
        Arg("k_sub", "SymInt?", "", "candidates kept per half, default k, k_sub <= n_sub", "None"),
        Arg("scale", "float?", "", "score scale, default Dk ** -0.5", "None"),
        Arg("sum_heads", "bool", "", "sum the heads' reads into one (B, T, Dv) output", "False"),
        Arg("sparse_grad", "bool", "", "the values gradient as a coalesced sparse COO tensor", "False"),
        _DETERMINISTIC,
        _BACKEND,
    ),
    outputs=(Output("out", "(B, H, T, Dv) or (B, T, Dv)", "input dtype"),
             Output("indices", "(B, H, T, k)", "int64 slot ids i * n_sub + j"),
             Output("weights", "(B, H, T, k)", "float32 (float64)"), Output("lse", "(B, H, T)", "float32 (float64)")),
    backends=_served("product_key_fwd", cuda_limits={"k": 256, "k_sub": 256, "N": 2 ** 31 - 1, "Dk": 512},
                     cuda_entry="product_key_segment_sum",
                     triton_limits={"k": 256, "k_sub": 256, "N": 2 ** 31 - 1}),
    cases=Cases(
        edge=(
            pk_case(2, 2, 7, 14, 33, 7, 5, 4, sum_heads=True),
            pk_case(2, 2, 9, 14, 7, 7, 6, 4, sparse_grad=True),                 # repeated slots, sparse grad
            pk_case(1, 1, 7, 2, 7, 1, 3, 3),                                     # Dk = 2, Dv = 1
            pk_case(1, 2, 13, 130, 7, 129, 49, 7),                               # k = k_sub ** 2, k_sub = n_sub
            pk_case(2, 1, 13, 14, 33, 7, 1, 8, sum_heads=True, sparse_grad=True),  # k = 1
        ),
        random=_pk_random, label=_pk_label,
        wide=(pk_case(2, 2, 40, 128, 40, 65, 16, 8),)),
    bench=Bench("product_key",
                shapes={"pkm-cpu": dict(B=1, H=4, T=2048, Dk=256, n_sub=1024, Dv=256, k=32)},
                tiny={"pkm-tiny": dict(B=1, H=2, T=32, Dk=16, n_sub=16, Dv=16, k=4)}),
    reference="product_key_read_ref",
)


# ------------------------------------------------------------------------------------------------
# gated_memory_write, gated_dense_update
# ------------------------------------------------------------------------------------------------

def write_case(B, Hm, N, D, T, kw, erase_one=False, index_dtype="int64"):
    """Hm None: a 3-D memory (B, N, D). Slot ids drawn from [-1, N) (repeats and skips)."""
    return dict(B=B, Hm=Hm or 1, heads=Hm is not None, N=N, D=D, T=T, kw=kw, erase_one=erase_one,
                index_dtype=index_dtype, slots="random", inplace=False)


def _write_random(rng: random.Random) -> dict:
    return write_case(rng.randint(1, 2), rng.choice([None, 1, 2, 3]), rng.randint(1, 65),
                  rng.choice([1, 7, 33, 64]), rng.randint(1, 12), rng.randint(1, 4),
                  erase_one=rng.random() < 0.5, index_dtype=rng.choice(["int32", "int64"]))


def _write_label(p: dict) -> str:
    heads = f"Hm{p['Hm']}" if p["heads"] else "3-D"
    return (f"B{p['B']} {heads} N{p['N']} D{p['D']} T{p['T']} kw{p['kw']}"
            + (" erase(..,1)" if p["erase_one"] else "") + f" {p['index_dtype']}")


GATED_MEMORY_WRITE = OpDecl(
    name="gated_memory_write",
    package="memory_write",
    summary="for t, then j, in order: M[s] <- M[s]·(1 - w·erase_t) + w·add_t with s = indices[t, j] >= 0",
    args=(
        Arg("memory", "Tensor", "(B, Hm, N, D) or (B, N, D)", "the memory, floating"),
        Arg("indices", "Tensor", "(B, Hm, T, kw) or (B, T, kw)", "int32/int64 slot ids in [-1, N); -1: no write"),
        Arg("weights", "Tensor", "indices' shape", "write strengths in [0, 1], memory's dtype"),
        Arg("add", "Tensor", "(B, Hm, T, D) or (B, T, D)", "vectors to add"),
        Arg("erase", "Tensor", "(B, Hm, T, D) or (B, Hm, T, 1)", "erase strengths in [0, 1]"),
        _BACKEND,
    ),
    outputs=(Output("memory", "memory's shape", "memory's dtype"),),
    backends=_served("gated_memory_write_fwd"),
    cases=Cases(
        edge=(
            write_case(2, 3, 7, 7, 7, 3),                                        # repeated slots, skips
            write_case(2, None, 29, 5, 7, 3, erase_one=True, index_dtype="int32"),  # 3-D memory
            write_case(1, 2, 63, 129, 7, 1, erase_one=True, index_dtype="int32"),
            write_case(2, 2, 3, 33, 16, 4),                                      # N = 3: heavy collisions
        ),
        random=_write_random, label=_write_label,
        wide=(write_case(2, 2, 200, 129, 24, 4),)),
    bench=Bench("memory_write",
                shapes={"write-cpu": dict(B=2, Hm=4, N=4096, D=128, T=256, kw=4)},
                tiny={"write-tiny": dict(B=1, Hm=2, N=64, D=16, T=8, kw=2)}),
    reference="gated_memory_write_ref",
)


def dense_case(memory, update, input_gate, forget_gate):
    """The four inputs' shapes (broadcast against each other)."""
    return dict(shapes=dict(memory=memory, update=update, input_gate=input_gate, forget_gate=forget_gate))


def _dense_random(rng: random.Random) -> dict:
    full = [rng.randint(1, 3) for _ in range(rng.randint(1, 3))] + [_odd(rng, 1, 129)]

    def broadcastable():
        shape = [1 if rng.random() < 0.4 else s for s in full]
        return tuple(shape[rng.randint(0, len(shape) - 1):])  # maybe drop leading dims
    return dense_case(tuple(full), broadcastable(), broadcastable(), broadcastable())


GATED_DENSE_UPDATE = OpDecl(
    name="gated_dense_update",
    package="memory_write",
    summary="σ(forget_gate)·memory + σ(input_gate)·tanh(update), broadcasting like PyTorch",
    args=(
        Arg("memory", "Tensor", "broadcastable", "one floating dtype for all four"),
        Arg("update", "Tensor", "broadcastable"),
        Arg("input_gate", "Tensor", "broadcastable", "logits"),
        Arg("forget_gate", "Tensor", "broadcastable", "logits"),
        _BACKEND,
    ),
    outputs=(Output("out", "the broadcast shape", "input dtype"),),
    backends=_served("gated_dense_update_fwd"),
    cases=Cases(
        edge=(
            dense_case(*((2, 3, 5, 7),) * 4),
            dense_case((2, 2, 5, 63), (1, 63), (2, 2, 5, 1), (2, 2, 5, 1)),  # per-slot gates
            dense_case((3, 7), (7,), (3, 1), (1, 1)),
            dense_case((2, 1, 4, 129), (1, 3, 1, 129), (3, 1, 1), ()),     # memory broadcast too
        ),
        random=_dense_random,
        label=lambda p: " ".join("x".join(map(str, s)) or "()" for s in p["shapes"].values()),
        wide=(dense_case(*((2, 4, 33, 130),) * 4),)),
    bench=Bench("memory_write",
                shapes={"dense-cpu": dict(B=8, Hm=4, N=4096, D=128)},    # gates (B, Hm, N, 1)
                tiny={"dense-tiny": dict(B=1, Hm=2, N=64, D=16)}),
    reference="gated_dense_update_ref",
)


# ------------------------------------------------------------------------------------------------
# merge_attention, gated_merge
# ------------------------------------------------------------------------------------------------

def merge_case(B, H, T, D, gate=None):
    """merge_attention: some rows of each side empty (lse -inf), on one side or both; gated_merge:
    the gate's shape."""
    return dict(B=B, H=H, T=T, D=D, empty="mixed") if gate is None else dict(B=B, H=H, T=T, D=D, gate=gate)


def _merge_shape(rng: random.Random):
    return rng.randint(1, 3), rng.randint(1, 4), _odd(rng, 3, 41), rng.choice([1, 5, 33, 64, 130])


def _gated_merge_random(rng: random.Random) -> dict:
    B, H, T, D = _merge_shape(rng)
    return merge_case(B, H, T, D, gate=rng.choice([(H, 1, 1), (B, H, T, 1), (1,), (T, 1), (B, 1, 1, 1)]))


def _merge_label(p: dict) -> str:
    label = "B{B} H{H} T{T} D{D}".format(**p)
    return label + " gate" + str(tuple(p["gate"])).replace(" ", "") if "gate" in p else label


MERGE_ATTENTION = OpDecl(
    name="merge_attention",
    package="merge",
    summary="lse = logaddexp(lse_a, lse_b), out = e^{lse_a - lse}·out_a + e^{lse_b - lse}·out_b",
    args=(
        Arg("out_a", "Tensor", "(B, H, T, D)", "attention output over key set A, floating"),
        Arg("lse_a", "Tensor", "(B, H, T)", "its log-sum-exp, float32 (float64 for float64 outputs)"),
        Arg("out_b", "Tensor", "(B, H, T, D)", "over key set B, out_a's dtype"),
        Arg("lse_b", "Tensor", "(B, H, T)", "its log-sum-exp"),
        _BACKEND,
    ),
    outputs=(Output("out", "(B, H, T, D)", "input dtype"), Output("lse", "(B, H, T)", "float32 (float64)")),
    backends=_served("merge_attention_fwd"),
    cases=Cases(
        edge=(
            merge_case(2, 3, 7, 63),                   # odd sizes; rows with one or both sides empty
            merge_case(1, 2, 129, 7),
            merge_case(1, 1, 1, 1),
            merge_case(2, 1, 5, 129),
        ),
        random=lambda rng: merge_case(*_merge_shape(rng)), label=_merge_label,
        wide=(merge_case(2, 2, 33, 130),)),
    bench=Bench("merge", shapes={"merge-cpu": dict(B=1, H=8, T=4096, D=64)},
                tiny={"merge-tiny": dict(B=1, H=2, T=64, D=16)}),
    reference="merge_attention_ref",
)

GATED_MERGE = OpDecl(
    name="gated_merge",
    package="merge",
    summary="g = σ(gate), out = g·out_mem + (1 - g)·out_local",
    args=(
        Arg("out_local", "Tensor", "(B, H, T, D)", "attention over the local context, floating"),
        Arg("out_mem", "Tensor", "(B, H, T, D)", "read from memory, same dtype"),
        Arg("gate", "Tensor", "broadcastable to (B, H, T, 1)", "logits, same dtype"),
        _BACKEND,
    ),
    outputs=(Output("out", "(B, H, T, D)", "input dtype"),),
    backends=_served("gated_merge_fwd"),
    cases=Cases(
        edge=(
            merge_case(2, 3, 7, 63, gate=(3, 1, 1)),   # one gate per head
            merge_case(1, 2, 129, 7, gate=(1, 2, 129, 1)),
            merge_case(2, 1, 5, 129, gate=()),
            merge_case(2, 3, 7, 33, gate=(7, 1)),
        ),
        random=_gated_merge_random, label=_merge_label,
        wide=(merge_case(2, 2, 33, 130, gate=(2, 1, 1)),)),
    bench=Bench("merge"),
    reference="gated_merge_ref",
)


# ------------------------------------------------------------------------------------------------
# memory_attention
# ------------------------------------------------------------------------------------------------

def attn_case(B, H, Hkv, Hm, T, S, D, Dv, N, topk, window=None, shared=False, valid_len=None,
          merge="joint", gate=None):
    return dict(B=B, H=H, Hkv=Hkv, Hm=Hm, T=T, S=S, D=D, Dv=Dv, N=N, topk=topk, window=window,
                shared=shared, valid_len=valid_len, merge=merge, gate=gate)


def _attn_random(rng: random.Random) -> dict:
    B, Hkv, Hm = rng.randint(1, 2), rng.choice([1, 2]), rng.choice([1, 2])
    H = 2 * rng.choice([1, 2])
    T = _odd(rng, 1, 21)
    S = T + rng.randint(0, 20)
    N = rng.randint(2, 60)
    merge = rng.choice(["joint", "gate"])
    gate = rng.choice([(H, 1, 1), (B, H, T, 1)]) if merge == "gate" else None
    return attn_case(B, H, Hkv, Hm, T, S, rng.choice([4, 8, 16, 33]), rng.choice([4, 7, 16]), N,
                 rng.randint(1, min(N, 16)), window=rng.choice([None, 1, rng.randint(1, S)]),
                 shared=rng.random() < 0.5, valid_len=_valid_lens(rng, B, N), merge=merge, gate=gate)


def _attn_label(p: dict) -> str:
    return _compact(f"B{p['B']} H{p['H']}/kv{p['Hkv']}/m{p['Hm']} T{p['T']} S{p['S']} D{p['D']} Dv{p['Dv']}"
                    f" N{p['N']} topk{p['topk']}" + (f" w{p['window']}" if p["window"] is not None else "")
                    + (" shared" if p["shared"] else "") + (f" valid{p['valid_len']}" if p["valid_len"] else "")
                    + f" {p['merge']}" + (f"{tuple(p['gate'])}" if p["gate"] is not None else ""))


MEMORY_ATTENTION = OpDecl(
    name="memory_attention",
    package="memory_attention",
    summary="causal (sliding-window) attention over the local context and a top-k memory read, "
            "merged jointly (one softmax) or by a gate",
    args=(
        Arg("q", "Tensor", "(B, H, T, D)", "queries; query t sits at position S - T + t"),
        Arg("k", "Tensor", "(B, Hkv, S, D)", "local keys, S >= T, H % Hkv == 0"),
        Arg("v", "Tensor", "(B, Hkv, S, Dv)", "local values"),
        Arg("mem_keys", "Tensor", "(B, Hm, N, D) or (Hm, N, D)", "memory keys, H % Hm == 0"),
        Arg("mem_values", "Tensor", "(B, Hm, N, Dv) or (Hm, N, Dv)", "memory values"),
        Arg("topk", "SymInt", "", "memory entries read per query, 1 <= topk <= min(N, 256)"),
        Arg("window", "SymInt?", "", "None (all keys j <= p) or w >= 1 (keys p - w < j <= p)", "None"),
        Arg("merge", "str", "", '"joint" (one softmax) or "gate" (sigmoid-gated blend)', '"joint"'),
        Arg("gate", "Tensor?", "broadcastable to (B, H, T, 1)", 'logits, required with merge="gate"', "None"),
        Arg("scale", "float?", "", "score scale for both parts, default D ** -0.5", "None"),
        Arg("valid_len", "Tensor?", "(B,)", "int32/int64 count of existing memory slots", "None"),
        _DETERMINISTIC,
        _BACKEND,
    ),
    outputs=(Output("out", "(B, H, T, Dv)", "input dtype"), Output("lse_local", "(B, H, T)", "float32 (float64)"),
             Output("lse_mem", "(B, H, T)", "float32 (float64)"), Output("indices", "(B, H, T, topk)", "int64")),
    # The cpu and cuda backends compose local attention with the top-k read (the cuda one's limits).
    backends=_served("local_attention_fwd", cuda_limits=dict(_TOPK_CUDA_LIMITS, S=2 ** 30),
                     cuda_entry="topk_read_chunk_max"),
    # On CUDA tensors triton's one fused kernel (tensor cores) first; the cuda composition (CUDA
    # cores) serves when named, or when triton cannot.
    auto_order={"cuda": ("triton", "cuda", "reference")},
    cases=Cases(
        edge=(
            attn_case(2, 4, 2, 2, 7, 7, 7, 5, 33, 4),                            # S = T, odd sizes, joint
            attn_case(2, 4, 2, 4, 9, 9, 8, 7, 16, 1, window=1000, shared=True, valid_len=[16, 0],
                  merge="gate", gate=(2, 4, 9, 1)),                          # topk 1, empty memory, gate
            attn_case(1, 4, 1, 1, 33, 50, 16, 16, 70, 8, window=5, shared=True, merge="gate", gate=(4, 1, 1)),
            attn_case(2, 4, 4, 2, 7, 20, 16, 8, 24, 24, window=1, valid_len=[24, 3]),  # window 1, topk = N
        ),
        random=_attn_random, label=_attn_label,
        wide=(attn_case(1, 4, 2, 2, 70, 90, 64, 64, 200, 16, window=40),)),
    bench=Bench("memory_attention",
                shapes={"attn-cpu": dict(B=1, H=8, Hkv=8, Hm=8, T=1024, S=1024, window=256, D=64, Dv=64,
                                         N=16384, topk=32)},
                tiny={"attn-tiny": dict(B=1, H=2, Hkv=2, Hm=2, T=32, S=32, window=8, D=16, Dv=16, N=128,
                                        topk=4)}),
    reference="memory_attention_ref",
)


# ------------------------------------------------------------------------------------------------
# block_topk, block_read
# ------------------------------------------------------------------------------------------------

def blocks_case(B, H, Hk, T, NB, S, D, Dv=None, k=None, R=None, valid=None, repeats=False, strided=False,
                ties=False):
    """One case of the block ops: queries (B, H, T, D) over NB blocks of S tokens per key-value head
    (Hk); block_topk scores R representatives per block (None: R = S, the block's keys) and selects
    k; block_read reads k blocks (Dv: the value size). ``valid``: None (every token exists),
    "random" (some padding) or "sparse" (some blocks and some rows' blocks with no valid token);
    ``repeats``: block_read's indices repeat a block; ``strided``: q transposed from (B, T, H, D)
    and the blocks narrowed from a larger buffer; ``ties``: block_topk's blocks have equal
    representatives in pairs."""
    return dict(B=B, H=H, Hk=Hk, T=T, NB=NB, S=S, D=D, Dv=D if Dv is None else Dv,
                k=NB if k is None else k, R=S if R is None else R, valid=valid, repeats=repeats,
                strided=strided, ties=ties)


def _blocks_random(rng: random.Random) -> dict:
    Hk = rng.choice([1, 2])
    NB, S = rng.randint(1, 12), rng.randint(1, 9)
    return blocks_case(rng.randint(1, 2), Hk * rng.choice([1, 2, 3]), Hk, _odd(rng, 1, 15), NB, S,
                       rng.choice([3, 8, 16, 33]), rng.choice([1, 5, 16]), rng.randint(0, NB),
                       R=rng.choice([1, S]), valid=rng.choice([None, "random", "sparse"]),
                       repeats=rng.random() < 0.3, strided=rng.random() < 0.5, ties=rng.random() < 0.2)


def _blocks_label(p: dict) -> str:
    return (f"B{p['B']} H{p['H']}/kv{p['Hk']} T{p['T']} NB{p['NB']} S{p['S']} R{p['R']} D{p['D']} Dv{p['Dv']}"
            f" k{p['k']}" + (f" valid={p['valid']}" if p["valid"] else "") + (" repeats" if p["repeats"] else "")
            + (" strided" if p["strided"] else "") + (" ties" if p["ties"] else ""))


# Served on every device by the reference, on CPU tensors by the cpu kernels.
_BLOCK_SERVED = {"reference": Serving(), "cpu": Serving(entry="block_read_bwd")}
_BLOCK_CASES = Cases(
    edge=(
        blocks_case(2, 4, 2, 7, 9, 5, 7, 5, k=3, R=1, valid="random"),        # grouped heads, padding
        blocks_case(1, 2, 1, 5, 6, 4, 8, 3, k=6, valid="sparse", repeats=True, strided=True),  # k = NB
        blocks_case(2, 3, 3, 1, 4, 1, 16, 16, k=0),                           # k = 0: nothing read
        blocks_case(1, 2, 2, 9, 8, 3, 5, 1, k=4, R=3, ties=True),             # equal blocks: smaller id first
        blocks_case(0, 2, 1, 3, 5, 4, 8, 8, k=2),                             # empty batch
    ),
    random=_blocks_random, label=_blocks_label,
    wide=(blocks_case(1, 4, 2, 40, 24, 70, 64, 40, k=6, valid="random"),))
_BLOCK_BENCH_SHAPE = dict(B=1, H=8, Hk=2, T=512, NB=128, S=64, D=128, Dv=128, k=16)
_BLOCK_BENCH_TINY = dict(B=1, H=4, Hk=2, T=16, NB=16, S=8, D=16, Dv=16, k=4)

BLOCK_TOPK = OpDecl(
    name="block_topk",
    package="block_memory",
    summary="scores[b,g,n] = scale·Σ_{rows of group g} max_{valid r} q·reprs[n,r]; the k best blocks "
            "(NaN first, ties: smaller block), in increasing order",
    args=(
        Arg("q", "Tensor", "(B, H, T, D)", "queries, floating, H % Hk == 0"),
        Arg("reprs", "Tensor", "(B, Hk, NB, R, D)", "representative keys of each block, q's dtype"),
        Arg("k", "SymInt", "", "blocks selected, 0 <= k <= NB"),
        Arg("repr_valid", "Tensor?", "(B, NB, R)", "bool: which representatives exist", "None"),
        Arg("scale", "float?", "", "score scale, default D ** -0.5", "None"),
        _BACKEND,
    ),
    outputs=(Output("indices", "(B, Hk, k)", "int64"), Output("scores", "(B, Hk, NB)", "float32 (float64)")),
    backends=dict(_BLOCK_SERVED, cpu=Serving(entry="block_topk_fwd")),
    cases=_BLOCK_CASES,
    bench=Bench("block_memory", shapes={"blocks-cpu": _BLOCK_BENCH_SHAPE}, tiny={"blocks-tiny": _BLOCK_BENCH_TINY}),
    reference="block_topk_ref",
)

BLOCK_READ = OpDecl(
    name="block_read",
    package="block_memory",
    summary="attention of each query over the valid tokens of its key-value head's selected blocks, "
            "with its log-sum-exp",
    args=(
        Arg("q", "Tensor", "(B, H, T, D)", "queries, floating, H % Hk == 0"),
        Arg("block_keys", "Tensor", "(B, Hk, NB, S, D)", "keys in blocks of S tokens, q's dtype"),
        Arg("block_values", "Tensor", "(B, Hk, NB, S, Dv)", "values, q's dtype"),
        Arg("indices", "Tensor", "(B, Hk, K)", "int64 block ids in [0, NB) read by key-value head g, K >= 0"),
        Arg("block_valid", "Tensor?", "(B, NB, S)", "bool: which tokens exist", "None"),
        Arg("scale", "float?", "", "score scale, default D ** -0.5", "None"),
        _BACKEND,
    ),
    outputs=(Output("out", "(B, H, T, Dv)", "input dtype"), Output("lse", "(B, H, T)", "float32 (float64)")),
    backends=_BLOCK_SERVED,
    cases=_BLOCK_CASES,
    bench=Bench("block_memory"),
    reference="block_read_ref",
)


# ------------------------------------------------------------------------------------------------
# quantized_topk_read
# ------------------------------------------------------------------------------------------------

def quantized_case(B, H, Hm, T, N, Dk, Dv, k, values="float32", keys="random"):
    """One case of the quantized read: int8 keys (Hm, N, Dk) read by queries (B, H, T, Dk).
    ``values``: the value format, "q" (q's dtype), a float dtype name, "int8" or "float8";
    ``keys``: "random" (int8 in [-127, 127]), "extremes" (mostly +-127) or "ties" (slots in pairs
    of identical rows, read smaller slot first)."""
    return dict(B=B, H=H, Hm=Hm, T=T, N=N, Dk=Dk, Dv=Dv, k=k, values=values, keys=keys)


def _quantized_random(rng: random.Random) -> dict:
    Hm = rng.randint(1, 2)
    N = rng.randint(1, 300)
    return quantized_case(rng.randint(1, 3), Hm * rng.choice([1, 2, 3]), Hm, _odd(rng, 1, 21), N,
                          rng.choice([3, 8, 16, 31, 64, 65]), rng.choice([1, 5, 16, 33]), rng.randint(1, min(N, 40)),
                          values=rng.choice(["q", "float32", "bfloat16", "int8", "float8"]),
                          keys=rng.choice(["random", "extremes", "ties"]))


def _quantized_label(p: dict) -> str:
    return (f"B{p['B']} H{p['H']}/{p['Hm']} T{p['T']} N{p['N']} Dk{p['Dk']} Dv{p['Dv']} k{p['k']} "
            f"values={p['values']}" + (f" keys={p['keys']}" if p["keys"] != "random" else ""))


QUANTIZED_TOPK_READ = OpDecl(
    name="quantized_topk_read",
    package="quantized_read",
    summary="qe = (q·scale)·key_scale (float32); s = qe·keysᵀ over int8 keys (float64); the k best slots I "
            "(ties: smaller slot); out = Σ_{i∈I} softmax(s_I)_i·values_i·value_scale_i",
    args=(
        Arg("q", "Tensor", "(B, H, T, Dk)", "queries, floating"),
        Arg("keys", "Tensor", "(Hm, N, Dk)", "int8 keys in [-127, 127], shared by the batch, H % Hm == 0, N >= 1"),
        Arg("key_scale", "Tensor", "(Hm, Dk)", "float32 channel scales, finite and > 0: key = keys·key_scale"),
        Arg("values", "Tensor", "(Hm, N, Dv)", "float (used as is), int8 or float8_e4m3fn (times value_scale)"),
        Arg("k", "SymInt", "", "slots read per query, 1 <= k <= N"),
        Arg("value_scale", "Tensor?", "(Hm, N)", "float32 entry scales: required for int8/float8 values, refused "
            "for float ones", "None"),
        Arg("scale", "float?", "", "score scale, default Dk ** -0.5", "None"),
        _BACKEND,
    ),
    outputs=(Output("out", "(B, H, T, Dv)", "input dtype"), Output("indices", "(B, H, T, k)", "int64"),
             Output("weights", "(B, H, T, k)", "float32 (float64)"), Output("lse", "(B, H, T)", "float32 (float64)")),
    # Served on every device by the reference, on CPU tensors by the cpu kernels.
    backends={"reference": Serving(), "cpu": Serving(entry="_topk_values_read")},
    cases=Cases(
        edge=(
            quantized_case(2, 4, 2, 5, 9, 16, 8, 9, values="int8"),                 # k = N, grouped heads
            quantized_case(1, 2, 1, 3, 1, 7, 5, 1, values="float8"),                # N = 1
            quantized_case(1, 3, 1, 7, 33, 13, 1, 5, values="q"),                   # Dv = 1, odd sizes
            quantized_case(2, 4, 2, 6, 40, 32, 16, 8, keys="ties"),                 # identical rows: smaller slot
            quantized_case(1, 2, 1, 9, 70, 64, 24, 16, values="bfloat16", keys="extremes"),  # keys +-127
            quantized_case(0, 2, 1, 3, 10, 8, 8, 3),                                # empty batch
        ),
        random=_quantized_random, label=_quantized_label,
        # Full VNNI tiles of slots and channels with tails past them, several vectors of values.
        wide=(quantized_case(1, 2, 1, 70, 700, 64, 40, 32, values="int8"),
              quantized_case(1, 2, 1, 33, 300, 100, 33, 16, values="float32", keys="ties"))),
    # Timed through the store's int8 reads (the benchmark's shapes are its own).
    bench=Bench("memory_store", shapes={}, tiny={}),
    reference="quantized_topk_read_ref",
)


OPS: dict[str, OpDecl] = {decl.name: decl for decl in (
    TOPK_MEMORY_READ, PRODUCT_KEY_READ, GATED_MEMORY_WRITE, GATED_DENSE_UPDATE, MERGE_ATTENTION,
    GATED_MERGE, MEMORY_ATTENTION, BLOCK_TOPK, BLOCK_READ, QUANTIZED_TOPK_READ)}


# ------------------------------------------------------------------------------------------------
# Sharded ops (l2m_kernels.distributed): each gives the result of a single-device op above on the
# memory of every rank of a torch.distributed group together.
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardedOpDecl:
    """One op of :mod:`l2m_kernels.distributed`, declared once.

    ``of``: the op of :data:`OPS` whose result it gives on the concatenated memory (its reference:
    ``l2m-check --distributed`` and the tests compare with that op run whole in one process).
    ``args``: the public function's arguments in order (its docs table in ``docs/distributed.md``
    has a row for each). ``cases``: ``l2m-check --distributed``'s edge cases and random shapes,
    dicts in the parameter names of :mod:`l2m_kernels.distributed.cases` (``sizes``: the shard
    pattern, whatever the number of ranks). ``bench``: the benchmark that times it against the
    number of ranks. No ``torch.ops`` entry and no backends of its own: it runs collectives and
    calls ``of`` (or its selection) on each rank's shard, on that op's backends.
    """

    name: str
    module: str                     # l2m_kernels.distributed.<module>
    of: str
    summary: str
    args: tuple[Arg, ...]
    outputs: tuple[Output, ...]
    cases: Cases
    bench: Bench


_GROUP = Arg("group", "ProcessGroup?", "", "the process group, default the world", "None")
_QUERIES = Arg("queries", "str", "", '"replicated" (every rank the same inputs) or "sharded" (each rank its own '
               "batch, of one shape on every rank)", '"replicated"')
_CHECK = Arg("check", "bool", "", "compare every rank's arguments in one small all-gather first, raising the "
             "same ValueError on every rank on a mismatch", "True")


def _shard_pattern(rng: random.Random) -> str:
    return rng.choice(("even", "uneven", "empty_first", "one_holds_all"))


def sharded_topk_case(B, H, Hm, T, N, Dk, Dv, k, **switches):
    return dict(B=B, H=H, Hm=Hm, T=T, N=N, Dk=Dk, Dv=Dv, k=k, **switches)


def _sharded_topk_random(rng: random.Random) -> dict:
    Hm = rng.randint(1, 2)
    N = rng.randint(4, 90)
    return sharded_topk_case(rng.randint(1, 2), Hm * rng.choice([1, 2]), Hm, _odd(rng, 1, 7), N,
                             rng.choice([3, 8, 16]), rng.choice([1, 5, 16]), rng.randint(1, min(N, 24)),
                             shared=rng.random() < 0.5, queries=rng.choice(("replicated", "sharded")),
                             sizes=_shard_pattern(rng), valid_len=rng.choice((None, "random", "short")),
                             ties=rng.random() < 0.3)


def _switches(p: dict, names) -> str:
    return "".join(f" {name}" if p.get(name) is True else f" {name}={p[name]}"
                   for name in names if p.get(name) not in (None, False))


def _sharded_topk_label(p: dict) -> str:
    return (_compact(f"B{p['B']} H{p['H']}/{p['Hm']} T{p['T']} N{p['N']} Dk{p['Dk']} Dv{p['Dv']} k{p['k']}")
            + _switches(p, ("queries", "sizes", "shared", "valid_len", "ties")))


SHARDED_TOPK_MEMORY_READ = ShardedOpDecl(
    name="sharded_topk_memory_read",
    module="topk",
    of="topk_memory_read",
    summary="topk_memory_read of the slots of every rank together (global slot ids); O(P·k + Dv) numbers a "
            "query cross the wire",
    args=(
        Arg("q", "Tensor", "(B, H, T, Dk)", "queries: the same on every rank, or this rank's batch"),
        Arg("keys", "Tensor", "(B, Hm, N_r, Dk) or (Hm, N_r, Dk)", "this rank's slots [offset_r, offset_r + N_r) "
            "(P·B leading with sharded queries)"),
        Arg("values", "Tensor", "(B, Hm, N_r, Dv) or (Hm, N_r, Dv)", "keys' leading shape"),
        Arg("k", "SymInt", "", "slots read per query, 1 <= k <= min(N_0 + ... + N_{P-1}, 256); may exceed N_r"),
        _GROUP, _QUERIES,
        Arg("scale", "float?", "", "score scale, default Dk ** -0.5", "None"),
        Arg("valid_len", "Tensor?", "(B,)", "over the global slots; this rank's batch with sharded queries", "None"),
        _CHECK,
        _BACKEND,
    ),
    outputs=TOPK_MEMORY_READ.outputs,
    cases=Cases(
        edge=(
            sharded_topk_case(2, 2, 2, 3, 16, 8, 6, 4),                                  # uneven shards
            sharded_topk_case(1, 2, 1, 3, 9, 8, 5, 9, queries="sharded", sizes="empty_first",
                              shared=True),                                              # k = N > every shard
            sharded_topk_case(2, 2, 1, 4, 12, 4, 3, 6, ties=True, shared=True),          # ties across shards
            sharded_topk_case(2, 2, 2, 3, 20, 8, 4, 5, valid_len="short",
                              queries="sharded"),                                        # valid_len < k
            sharded_topk_case(1, 1, 1, 2, 7, 5, 3, 3, sizes="one_holds_all"),            # empty shards
            sharded_topk_case(2, 2, 2, 0, 10, 8, 4, 3, queries="sharded"),               # no queries
        ),
        random=_sharded_topk_random, label=_sharded_topk_label),
    bench=Bench("distributed"),
)


def sharded_product_key_case(B, H, T, Dk, n_sub, Dv, k, **switches):
    return dict(B=B, H=H, T=T, Dk=Dk, n_sub=n_sub, Dv=Dv, k=k, **switches)


def _sharded_product_key_random(rng: random.Random) -> dict:
    n_sub = rng.randint(2, 9)
    k_sub = rng.randint(1, n_sub)
    return sharded_product_key_case(rng.randint(1, 2), rng.randint(1, 3), _odd(rng, 1, 5), rng.choice([4, 8, 16]),
                                    n_sub, rng.choice([1, 5, 9]), rng.randint(1, k_sub * k_sub), k_sub=k_sub,
                                    shard=rng.choice(("rows", "columns")),
                                    queries=rng.choice(("replicated", "sharded")), sizes=_shard_pattern(rng),
                                    sum_heads=rng.random() < 0.5, sparse_grad=rng.random() < 0.3,
                                    ties=rng.random() < 0.3)


def _sharded_product_key_label(p: dict) -> str:
    return (_compact(f"B{p['B']} H{p['H']} T{p['T']} Dk{p['Dk']} n_sub{p['n_sub']} Dv{p['Dv']} k{p['k']}")
            + _switches(p, ("k_sub", "shard", "queries", "sizes", "sum_heads", "sparse_grad", "ties")))


SHARDED_PRODUCT_KEY_READ = ShardedOpDecl(
    name="sharded_product_key_read",
    module="product_key",
    of="product_key_read",
    summary="product_key_read with replicated sub-keys and the values split across the ranks by rows (slots) "
            "or by columns (features)",
    args=(
        Arg("q", "Tensor", "(B, H, T, Dk)", "queries: the same on every rank, or this rank's batch"),
        Arg("subkeys", "Tensor", "(H, 2, n_sub, Dk // 2)", "the same on every rank"),
        Arg("values", "Tensor", "(N_r, Dv) or (n_sub ** 2, Dv_r)", "this rank's rows or columns"),
        Arg("k", "SymInt", "", "slots read per query and head, 1 <= k <= k_sub ** 2"),
        Arg("k_sub", "SymInt?", "", "candidates kept per half, default k", "None"),
        _GROUP,
        Arg("shard", "str", "", '"rows" or "columns"', '"rows"'),
        _QUERIES,
        Arg("scale", "float?", "", "score scale, default Dk ** -0.5", "None"),
        Arg("sum_heads", "bool", "", "sum the heads' reads into one (B, T, Dv) output", "False"),
        _CHECK,
        _BACKEND,
        _DETERMINISTIC,
        Arg("sparse_grad", "bool", "", "the values shard's gradient as a coalesced sparse COO tensor", "False"),
    ),
    outputs=PRODUCT_KEY_READ.outputs,
    cases=Cases(
        edge=(
            sharded_product_key_case(2, 3, 4, 8, 5, 7, 4),                               # rows, uneven
            sharded_product_key_case(1, 2, 3, 8, 4, 6, 5, k_sub=3, shard="columns",
                                     queries="sharded", sum_heads=True),                 # columns, data parallel
            sharded_product_key_case(2, 2, 3, 4, 3, 5, 9, k_sub=3, ties=True,
                                     sizes="empty_first"),                               # k = N, ties
            sharded_product_key_case(1, 1, 5, 8, 6, 4, 3, shard="columns", sizes="one_holds_all",
                                     sparse_grad=True),                                  # empty column shards
            sharded_product_key_case(2, 2, 2, 8, 4, 3, 4, queries="sharded", sparse_grad=True),
            sharded_product_key_case(1, 2, 0, 8, 4, 3, 2, shard="columns"),              # no queries
        ),
        random=_sharded_product_key_random, label=_sharded_product_key_label),
    bench=Bench("distributed"),
)


def sharded_write_case(B, Hm, T, kw, N, D, **switches):
    return dict(B=B, Hm=Hm, T=T, kw=kw, N=N, D=D, **switches)


def _sharded_write_random(rng: random.Random) -> dict:
    return sharded_write_case(rng.randint(1, 2), rng.choice([0, 1, 2]), rng.randint(1, 6), rng.randint(1, 4),
                              rng.randint(2, 40), rng.choice([1, 4, 7]), queries=rng.choice(("replicated", "sharded")),
                              sizes=_shard_pattern(rng), int32_ids=rng.random() < 0.3,
                              erase_per_feature=rng.random() < 0.7)


def _sharded_write_label(p: dict) -> str:
    return (f"B{p['B']} Hm{p['Hm']} T{p['T']} kw{p['kw']} N{p['N']} D{p['D']}"
            + _switches(p, ("queries", "sizes", "int32_ids")) + ("" if p.get("erase_per_feature", True)
                                                               else " erase=(T,1)"))


SHARDED_GATED_MEMORY_WRITE = ShardedOpDecl(
    name="sharded_gated_memory_write",
    module="write",
    of="gated_memory_write",
    summary="gated_memory_write into the slots of every rank together: each rank applies, in order, the writes "
            "that fall in its slots",
    args=(
        Arg("memory", "Tensor", "(B, Hm, N_r, D) or (B, N_r, D)", "this rank's slots (P·B leading with sharded "
            "writes)"),
        Arg("indices", "Tensor", "(B, Hm, T, kw) or (B, T, kw)", "int32/int64 global slot ids in [-1, N), -1: no "
            "write"),
        Arg("weights", "Tensor", "indices' shape", "write strengths in [0, 1]"),
        Arg("add", "Tensor", "(B, Hm, T, D) or (B, T, D)", "vectors to add"),
        Arg("erase", "Tensor", "(B, Hm, T, D or 1) or (B, T, D or 1)", "erase strengths in [0, 1]"),
        _GROUP, _QUERIES, _CHECK, _BACKEND,
    ),
    outputs=(Output("memory", "memory's shape", "memory's dtype"),),
    cases=Cases(
        edge=(
            sharded_write_case(2, 2, 5, 3, 16, 4),                                       # repeats across shards
            sharded_write_case(1, 0, 4, 2, 9, 5, queries="sharded", sizes="empty_first",
                               erase_per_feature=False),                                 # 3-D memory
            sharded_write_case(2, 1, 3, 4, 6, 3, int32_ids=True, sizes="one_holds_all"),  # empty shards
            sharded_write_case(0, 2, 3, 2, 8, 4),                                        # empty batch
        ),
        random=_sharded_write_random, label=_sharded_write_label),
    bench=Bench("distributed"),
)


SHARDED_OPS: dict[str, ShardedOpDecl] = {decl.name: decl for decl in (
    SHARDED_TOPK_MEMORY_READ, SHARDED_PRODUCT_KEY_READ, SHARDED_GATED_MEMORY_WRITE)}


def served_by(backend: str) -> frozenset:
    """The ops ``backend`` has kernels for."""
    return frozenset(name for name, decl in OPS.items() if backend in decl.backends)


def size_limits(backend: str) -> dict[str, dict[str, int]]:
    """``{op: {size name: largest value}}`` for the ops where ``backend`` has limits."""
    return {name: dict(decl.backends[backend].size_limits) for name, decl in OPS.items()
            if backend in decl.backends and decl.backends[backend].size_limits}


def benchmarks() -> tuple[str, ...]:
    """The ``l2m-bench`` op benchmarks, in declaration order (one benchmark may time several ops)."""
    return tuple(dict.fromkeys(decl.bench.module for decl in OPS.values()))


def triton_modules() -> tuple[str, ...]:
    """The modules whose Triton kernels the compile check compiles."""
    return tuple(dict.fromkeys(decl.triton_module for decl in OPS.values() if decl.triton_module))
