"""The copy contract of the losses and bounds, and their checks staying out of the way on a GPU.

1. Copyable as written.  Every public loss or bound (every `def name_loss(` or
   `def name_bound(` of infonce.py, vince_bound.py, instance_disc.py and
   local_agg.py) ends its docstring with `To copy: <function>[, helper, ...]`.
   Here those definitions are copied the way a reader would, from
   inspect.getsource, into a namespace that holds only torch, math and F
   (torch.nn.functional), and the copy must give the same value and the same
   gradient as the module's own function, on random float32 and bfloat16
   inputs.  Every listed helper must be needed (leaving it out fails with a
   NameError).  A copy is lean: within its size target in code lines (no
   docstring, comment or blank line) and in total lines, no line over 100
   characters, and nothing in it that points back into this repository.

2. No host synchronization off the CPU.  The losses check shapes and arguments
   only, and MemoryBank.update reads values (unit norms, index ranges) on the
   CPU only (the indices stay there); every other line must work
   without reading a tensor's values on the host, which on a GPU would stall
   the host until the device catches up (.item(), .tolist(), bool(tensor),
   nonzero, boolean masks).  No GPU is needed to check that: on the meta
   device tensors have shapes and dtypes but no values, so every such read
   raises, and the code takes the same branches as on CUDA (it only ever
   asks whether a device is the CPU).  Each loss runs forward and backward on
   meta tensors, and so does MemoryBank.update, with a duplicate index.
"""

import ast
import inspect
import math
import re
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import infonce
import instance_disc
import local_agg
import memory_bank
import vince_bound

REPO = Path(__file__).resolve().parents[1]
MODULES = [infonce, vince_bound, instance_disc, local_agg]
PUBLIC_LOSS = re.compile(r"^def ([a-z][a-z0-9_]*_(?:loss|bound))\(", re.MULTILINE)

# Copy-size targets for the whole copy (the function plus the helpers its `To copy:` line names):
# (code lines, total lines): the most a lean copy may take.
LOSS_TARGETS = {
    "ir_loss": (10, 25),
    "ir_nce_loss": (22, 50),
    "ball_loss": (30, 60),
    "ann_loss": (45, 80),
    "la_loss": (40, 75),
}
BOUND_TARGETS = (15, 30)  # every bound: at most 15 code lines and 30 lines in all ...
BOUND_HELPERS = (1, 6)  # ... with at most one helper of at most 6 source lines
# What a copy must not mention: the files of this repository, its README, tests and timings.
REPOSITORY = re.compile(
    r"README|module docstring|tests/|bench_|MemoryBank|run_kmeans|\b\d+(\.\d+)? ?ms\b|"
    r"\b(infonce|vince_bound|instance_disc|local_agg|memory_bank|spiral|imagenet_train)\b"
)


def public_losses():
    """(module, name) of every public *_loss / *_bound definition, read from the source files."""
    return [
        (module, name)
        for module in MODULES
        for name in PUBLIC_LOSS.findall(inspect.getsource(module))
    ]


def to_copy(function):
    """The names on the last line of the docstring, `To copy: function, helper, ...`."""
    last = inspect.getdoc(function).splitlines()[-1]
    assert last.startswith("To copy: "), (
        f"{function.__name__}: the docstring must end with 'To copy: ...'"
    )
    return [name.strip() for name in last[len("To copy: ") :].split(",")]


def copy_of(module, names):
    """Exec the source of `names` (from `module`) in a namespace with only torch, math and F."""
    namespace = {"torch": torch, "math": math, "F": F}
    for name in names:
        exec(
            compile(inspect.getsource(getattr(module, name)), f"<copy of {name}>", "exec"),
            namespace,
        )
    return namespace[names[0]]


# ----------------------------------------------------------------------
# Inputs for every public loss and bound: (tensors that get a gradient, the other arguments).
# ----------------------------------------------------------------------
def _unit(n, d, seed):
    return F.normalize(
        torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1
    )


def bank_problem(dtype, device="cpu", n=300, d=16, b=8):
    """A bank, views z near their own rows (so i is usually in B_i), indices and cluster labels."""
    bank = _unit(n, d, 0)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:b]
    z = F.normalize(bank[idx] + 0.8 * _unit(b, d, 2), dim=1)
    labels = torch.randint(0, 30, (3, n), generator=torch.Generator().manual_seed(3))
    move = lambda t: t.to(device)  # noqa: E731
    return move(z.to(dtype)), move(bank.to(dtype)), move(idx), move(labels)


def scores(dtype, device="cpu", b=16, k=9):
    return (3 * torch.randn(b, k, generator=torch.Generator().manual_seed(4))).to(dtype).to(device)


def vector(dtype, device="cpu", b=16, seed=5):
    return torch.randn(b, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def calls(dtype, device="cpu"):
    """name -> (leaf tensors, function of (fn, *leaves) returning the loss)."""
    z, bank, idx, labels = bank_problem(dtype, device)
    close_set = torch.cat(
        [labels.new_full((len(idx), 1), -1), idx[:, None]], dim=1
    )  # i itself, padded
    gen = lambda: torch.Generator().manual_seed(6) if device == "cpu" else None  # noqa: E731
    s = scores(dtype, device)
    return {
        "infonce_bound": ([s], lambda fn, s: fn(s)),
        "infonce_loss": ([s], lambda fn, s: fn(s)),
        "nwj_bound": ([s], lambda fn, s: fn(s)),
        "ba_bound": (
            [vector(dtype, device), vector(dtype, device, seed=7)],
            lambda fn, q, p: fn(q, p),
        ),
        "uba_bound": ([s, vector(dtype, device)], lambda fn, s, lz: fn(s, lz)),
        "vince_bound": ([s, 0.1 * vector(dtype, device)], lambda fn, s, w: fn(s, w)),
        "corollary_3_1_2_bound": ([s], lambda fn, s: fn(s, -1.5)),
        "ir_loss": ([z], lambda fn, z: fn(z, bank, idx, 0.1)),
        "ir_nce_loss": ([z], lambda fn, z: fn(z, bank, idx, 0.1, 50, gen())),
        "ball_loss": ([z], lambda fn, z: fn(z, bank, idx, 0.1, 20)),
        "ann_loss": ([z], lambda fn, z: fn(z, bank, idx, 0.1, 20, 4, neighbours_of="bank")),
        "ann_loss, close_set": (
            [z],
            lambda fn, z: fn(z, bank, idx, 0.1, 20, k_close=close_set, add_positive=False),
        ),
        "la_loss": ([z], lambda fn, z: fn(z, bank, idx, labels, 0.1, 20)),
        "la_loss, M[i]": (
            [z],
            lambda fn, z: fn(
                z, bank, idx, labels, 0.1, 20, neighbours_of="bank", add_positive=False
            ),
        ),
    }


def value_and_gradients(fn, leaves, call):
    leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    value = call(fn, *leaves)
    return value.detach(), torch.autograd.grad(value.sum(), leaves)


# ----------------------------------------------------------------------
# 1. The copy contract.
# ----------------------------------------------------------------------
def test_every_public_loss_and_bound_is_covered():
    found = {name for _, name in public_losses()}
    assert {case.split(",")[0] for case in calls(torch.float32)} == found
    assert set(LOSS_TARGETS) <= found
    for module in MODULES + [memory_bank]:  # one 'To copy:' per public loss or bound, file by file
        text = Path(module.__file__).read_text()
        assert len(PUBLIC_LOSS.findall(text)) == text.count("To copy:"), module.__name__


def copy_size(module, names):
    """(code lines, total lines) of the copy: lines of inspect.getsource, without docstrings,
    comments and blank lines for the first figure."""
    code = total = 0
    for name in names:
        source = textwrap.dedent(inspect.getsource(getattr(module, name)))
        docstrings = set()
        for node in ast.walk(ast.parse(source)):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                    docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
        lines = source.splitlines()
        total += len(lines)
        code += sum(
            1
            for number, line in enumerate(lines, 1)
            if number not in docstrings and line.strip() and not line.strip().startswith("#")
        )
    return code, total


def test_copy_size_counts_code_and_total_lines(tmp_path, monkeypatch):
    # The measure itself, on a known file: f has 3 code lines (def, if, return) of 8.
    source = 'def f(x):\n    """Doc\n    string."""\n\n    # comment\n    if x:  # no\n'
    (tmp_path / "known.py").write_text(source + '        return "# not a comment"\n\n\nY = 1\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    import known

    assert copy_size(known, ["f"]) == (3, 7)


@pytest.mark.parametrize("module, name", public_losses(), ids=lambda x: getattr(x, "__name__", x))
def test_copy_names_exactly_what_it_needs_within_its_size_target(module, name):
    names = to_copy(getattr(module, name))
    assert names[0] == name
    helpers = names[1:]
    code, total = copy_size(module, names)
    if name in LOSS_TARGETS:
        assert code <= LOSS_TARGETS[name][0] and total <= LOSS_TARGETS[name][1], (code, total)
    else:  # a bound of infonce.py or vince_bound.py
        most_helpers, most_helper_lines = BOUND_HELPERS
        helper_lines = sum(len(inspect.getsource(getattr(module, h)).splitlines()) for h in helpers)
        assert len(helpers) <= most_helpers and helper_lines <= most_helper_lines, helpers
        assert code <= BOUND_TARGETS[0] and total <= BOUND_TARGETS[1], (code, total)
    for left_out in helpers:  # every listed helper is needed: the copy without it fails
        partial = copy_of(module, [n for n in names if n != left_out])
        leaves, call = calls(torch.float32)[name]
        with pytest.raises(NameError, match=left_out):
            call(partial, *leaves)


@pytest.mark.parametrize("module, name", public_losses(), ids=lambda x: getattr(x, "__name__", x))
def test_the_copy_is_self_contained_and_within_100_characters(module, name):
    names = to_copy(getattr(module, name))
    for part in names:
        source = inspect.getsource(getattr(module, part))
        assert max(len(line) for line in source.splitlines()) <= 100, part
        for copied in names:  # the copy may name itself
            source = source.replace(copied, "")
        assert not REPOSITORY.search(source), (part, REPOSITORY.search(source))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(calls(torch.float32)))
def test_the_copy_gives_the_same_value_and_gradient(case, dtype):
    name = case.split(",")[0]
    module = next(m for m, n in public_losses() if n == name)
    leaves, call = calls(dtype)[case]
    copied = copy_of(module, to_copy(getattr(module, name)))
    value, gradients = value_and_gradients(getattr(module, name), leaves, call)
    copy_value, copy_gradients = value_and_gradients(copied, leaves, call)
    assert (
        value.dtype == torch.float32 and torch.isfinite(value).all()
    )  # float32 arithmetic for bf16 inputs too
    assert torch.equal(copy_value, value)
    for got, expected in zip(copy_gradients, gradients, strict=True):
        assert (
            got.dtype == dtype and torch.equal(got, expected) and torch.isfinite(got.float()).all()
        )


def test_at_most_one_custom_autograd_function_in_the_project():
    defined = [
        m
        for path in REPO.glob("*.py")
        for m in re.findall(
            r"^class (\w+)\(torch\.autograd\.Function\)", path.read_text(), re.MULTILINE
        )
    ]
    assert defined == ["BackgroundLogits"]


# ----------------------------------------------------------------------
# 2. No host reads off the CPU.
# ----------------------------------------------------------------------
def test_meta_tensors_refuse_every_host_read():
    # The premise of the test below: on the meta device each kind of host read raises.
    x = torch.ones(4, device="meta")
    for read in (
        lambda: x.sum().item(),
        lambda: bool((x > 0).any()),
        lambda: x.tolist(),
        lambda: x.nonzero(),
        lambda: x[x > 0],
        lambda: x.cpu(),
        lambda: int(x.max()),
    ):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


@pytest.mark.parametrize("case", list(calls(torch.float32)))
def test_losses_run_forward_and_backward_without_reading_values_off_the_cpu(case):
    name = case.split(",")[0]
    module = next(m for m, n in public_losses() if n == name)
    leaves, call = calls(torch.float32, device="meta")[case]
    value, gradients = value_and_gradients(getattr(module, name), leaves, call)
    assert value.device.type == "meta" and all(
        g.shape == leaf.shape for g, leaf in zip(gradients, leaves, strict=True)
    )


def test_memory_bank_update_reads_nothing_from_the_device():
    # Indices stay on the CPU (where the DataLoader yields them): duplicates are counted there.
    bank = memory_bank.MemoryBank(50, 16, device="meta")
    indices = torch.tensor([3, 7, 3, 9])
    bank.update(indices, F.normalize(torch.randn(4, 16), dim=1).to("meta"), alpha=0.5)
    assert bank.vectors.device.type == "meta" and bank.num_updates == 1
