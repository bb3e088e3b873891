# The docs' ```python blocks run, or are listed with the reason they cannot, so they cannot drift
# from the code unnoticed. Every block is one of:
# - RUN: executed unchanged on the CPU (Triton under the interpreter) after a prelude that
#   defines the names the text leaves to the reader, then checked against what the text says
#   (the "equivalent PyTorch" blocks against the op itself);
# - SIGNATURES: a signature listing, compared with the function's real signature;
# - NOT_RUN (with the reason): its imports must resolve and its calls of the imported functions
#   and classes (and of objects built from them) must bind to their signatures.
# A new block that is none of these fails test_every_block_is_checked.
from __future__ import annotations

import ast
import copy
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
# Where impl="triton" runs: CUDA when present, else the CPU under the interpreter (conftest).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _blocks() -> dict[str, tuple[str, int]]:
    """'docs/ops/silu_mul.md[1]' -> (the block's code, its first line's number)."""
    out = {}
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        fences = re.finditer(r"^```python[ \t]*\n(.*?)^```", text, re.S | re.M)
        for i, match in enumerate(fences):
            out[f"{doc.relative_to(ROOT).as_posix()}[{i}]"] = (
                match.group(1), text.count("\n", 0, match.start()) + 2)
    return out


BLOCKS = _blocks()


def _exec(block_id: str, code: str, ns: dict) -> dict:
    """Run ``code`` in ``ns``; tracebacks name the doc and its line numbers."""
    _, line = BLOCKS[block_id]
    tree = ast.parse(code, filename=block_id)
    ast.increment_lineno(tree, line - 1)
    exec(compile(tree, block_id.split("[")[0], "exec"), ns)  # noqa: S102 - the docs' own code
    return ns


def _close(actual, expected, **tol) -> None:
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **tol)


def _on(device: str, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


# ---------------------------------------------------------------------------------------- RUN


def _run_readme_loss(block_id, code):
    ns = _exec(block_id, code, {})
    loss_fn, pred, target, mask = ns["loss_fn"], ns["pred"], ns["target"], ns["mask"]
    ref = loss_fn(pred.detach().float(), target.float(), mask)
    _close(ns["loss"], ref.loss, rtol=1e-4, atol=1e-4)
    _close(ns["loss"], ns["smooth_l1"] + ns["contrastive"], rtol=1e-6, atol=1e-6)
    assert pred.grad is not None and pred.grad.shape == pred.shape
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.item() == 2.0


def _only(code: str, start: str, stop: str | None = None) -> str:
    """The lines of ``code`` from the one holding ``start`` up to the one holding ``stop``,
    the others blanked (so tracebacks keep the doc's line numbers)."""
    lines = code.splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if start in line)
    last = len(lines) if stop is None else next(
        i for i, line in enumerate(lines) if stop in line and i > first)
    return "".join(line if first <= i < last else "\n" for i, line in enumerate(lines))


def _run_edl_semantics(block_id, code):
    from olakernels import embedding_distill_loss

    per_sample = _only(code, "m = mask.float()", '# mask_mode="seed"')
    pred = torch.randn(6, 3, 5, dtype=torch.float64) * 2
    target = pred + torch.randn_like(pred) * 0.7
    for mask in (torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64),
                 torch.zeros(6, dtype=torch.float64)):
        # per_sample: the lines up to the seed's; seed: the whole block, as a reader runs it
        for mode, lines in (("per_sample", per_sample), ("seed", code)):
            ns = {"torch": torch, "F": F, "pred": pred, "target": target, "mask": mask,
                  "B": 6, "D": 15, "beta": 0.5, "contrastive_weight": 0.3,
                  "max_logit_scale": 100.0, "logit_scale": torch.tensor(2.5, dtype=torch.float64)}
            ns = _exec(block_id, lines, ns)
            for impl in ("torch", "reference"):
                out = embedding_distill_loss(pred, target, mask, ns["logit_scale"], beta=0.5,
                                             mask_mode=mode, impl=impl)
                _close(out.smooth_l1, ns["smooth_l1"])
                _close(out.contrastive, ns["contrastive"])


def _run_lce_semantics(block_id, code):
    from olakernels import linear_cross_entropy

    hidden = torch.randn(2, 5, 16, dtype=torch.float64)
    weight, bias = torch.randn(11, 16, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 1] = labels[1, 3] = -7
    cases = [dict(reduction="mean"), dict(reduction="sum", shift_labels=True, bias=bias),
             dict(reduction="none", logit_softcap=3.0, label_smoothing=0.1, z_loss_weight=1e-2),
             dict(reduction="mean", labels=torch.full_like(labels, -7))]
    for case in cases:
        args = dict(bias=None, ignore_index=-7, reduction="mean", label_smoothing=0.0,
                    z_loss_weight=0.0, logit_softcap=None, shift_labels=False, labels=labels)
        args.update(case)
        ns = _exec(block_id, code, {"torch": torch, "F": F, "hidden": hidden, "weight": weight,
                                    **args})
        options = {k: v for k, v in args.items() if k not in ("labels", "bias")}
        bias32 = None if args["bias"] is None else args["bias"].float()
        for impl in ("triton", "torch"):
            h, w, b, y = _on(TRITON_DEVICE if impl == "triton" else "cpu", hidden.float(),
                             weight.float(), bias32, args["labels"])
            out = linear_cross_entropy(h, w, y, bias=b, **options, return_stats=True, impl=impl)
            _close(out.loss, ns["loss"], rtol=1e-5, atol=1e-5)
            assert torch.equal(out.num_valid.cpu(), ns["num_valid"])
            assert torch.equal(out.correct.cpu(), ns["correct"]), (case, impl)
        assert torch.isfinite(ns["loss"]).all()


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _run_lce_hf(block_id, code):
    from olakernels import LinearCrossEntropy

    model = _tiny_llama()
    ref = copy.deepcopy(model)
    input_ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    ns = _exec(block_id, code, {"model": model, "LinearCrossEntropy": LinearCrossEntropy,
                                "input_ids": input_ids, "mask": mask, "labels": labels})
    expected = ref(input_ids, attention_mask=mask, labels=labels)
    _close(ns["loss"], expected.loss, rtol=1e-5, atol=1e-6)
    _close(ns["logits"], ref(input_ids).logits, rtol=1e-5, atol=1e-6)


def _run_perceiver_head(block_id, code):
    hidden_states = torch.randn(1, 4, 4096)
    special_depth_tokens = torch.randn(576, 4096)
    ns = _exec(block_id, code, {"hidden_states": hidden_states,
                                "special_depth_tokens": special_depth_tokens})
    depth, pred = ns["depth"], ns["pred"]
    assert pred.shape == (1, 576, 1024)
    pred.float().square().mean().backward()
    trained = {name.split(".")[0] for name, p in depth.named_parameters() if p.grad is not None}
    assert trained == {"projector", "linear_1"}, trained


def _run_rope_usage(block_id, code):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    decoder = _tiny_llama().model
    hidden = torch.randn(2, 7, 32)
    position_ids = torch.arange(7).expand(2, 7)
    q, k = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8)
    ns = _exec(block_id, code, {"decoder": decoder, "hidden": hidden,
                                "position_ids": position_ids, "q": q, "k": k})
    assert ns["cos"].shape == (2, 7, 8)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, ns["cos"], ns["sin"])
    _close(ns["q_rot"], q_ref)
    _close(ns["k_rot"], k_ref)


def _run_rope_semantics(block_id, code):
    from olakernels import rotary_embedding

    q, k = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8)
    cos, sin = torch.randn(2, 7, 8), torch.randn(2, 7, 8)  # any tables of the half rotation
    ns = _exec(block_id, code, {"torch": torch, "q": q, "k": k, "cos": cos, "sin": sin, "D": 8})
    for impl in ("triton", "torch"):
        device = TRITON_DEVICE if impl == "triton" else "cpu"
        q_rot, k_rot = rotary_embedding(*_on(device, q, k, cos, sin), impl=impl)
        _close(q_rot, ns["q_rot"])
        _close(k_rot, ns["k_rot"])


def _run_silu_usage(block_id, code):
    from torch import nn

    x = torch.randn(3, 5, 16)
    gate_proj, up_proj, gate_up_proj = nn.Linear(16, 24), nn.Linear(16, 24), nn.Linear(16, 48)
    ns = _exec(block_id, code, {"x": x, "gate_proj": gate_proj, "up_proj": up_proj,
                                "gate_up_proj": gate_up_proj})
    gate, up = gate_up_proj(x).chunk(2, dim=-1)
    _close(ns["y"], F.silu(gate) * up)
    assert ns["gate"].stride() == (240, 48, 1)  # "strided halves, no copy"


def _run_silu_semantics(block_id, code):
    from olakernels import silu_mul

    gate, up = torch.randn(4, 6, 10), torch.randn(4, 6, 10)
    ns = _exec(block_id, code, {"F": F, "gate": gate, "up": up})
    for impl in ("triton", "torch"):
        device = TRITON_DEVICE if impl == "triton" else "cpu"
        _close(silu_mul(*_on(device, gate, up), impl=impl), ns["y"])


def _run_tiny_tower(block_id, code, tmp_path):
    """The block's CPU lines (a tiny tower), then its attribute and forward lines on that tower;
    the real-weights lines are checked by name only."""
    from olavlm.models import build_tiny_vision_tower, build_vision_tower

    assert not _call_problems(code)
    ns = _exec(block_id, _only(code, "# tests and CPU demos"), {
        "build_tiny_vision_tower": build_tiny_vision_tower,
        "build_vision_tower": build_vision_tower, "tmp_dir": tmp_path})
    ns["images"] = torch.randn(2, 3, 48, 48)
    ns = _exec(block_id, _only(code, "tower.image_size", "# ConvNeXt"), ns)
    tower, features = ns["tower"], ns["features"]
    assert ns["path"] == tmp_path / "tiny-clip"
    assert (tower.image_size, tower.num_tokens, tower.hidden_size) == (48, 36, 32)
    assert features.shape == (2, 36, 32) and not features.requires_grad


def _run_checkpoint_io(block_id, code, tmp_path, monkeypatch):
    """The export lines on a tiny model (their relative out/ paths in tmp_path), then the seed
    import lines on the seed layout they wrote; the released checkpoint's line by name only."""
    from olavlm.models import build_tiny_vision_tower

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "models"))
    monkeypatch.chdir(tmp_path)
    from tiny_ola import tiny_model

    assert not _call_problems(code)
    tower_path = build_tiny_vision_tower("clip", tmp_path / "towers", image_size=32)
    trained = tiny_model(tmp_path, vision_tower=str(tower_path))
    ns = _exec(block_id, _only(code, "from olavlm.models.checkpoint_io", "# A seed"), {})
    ns = _exec(block_id, _only(code, "export_hf(model"), {**ns, "model": trained})
    assert {"llm", "olavlm.safetensors", "olavlm_config.json"} <= {
        p.name for p in (tmp_path / "out" / "run1").iterdir()}
    ns.update(seed_dir="out/seed", tower_path=tower_path)
    ns = _exec(block_id, _only(code, "model = load_seed_checkpoint(seed_dir", "export_hf"), ns)
    assert (tmp_path / "w" / "ola-llm" / "config.json").exists()
    expected, got = trained.state_dict(), ns["model"].state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        _close(got[key], value, rtol=0, atol=0)


def _run_checkpointer(block_id, code, tmp_path):
    from torch import nn

    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()

    class Loader:  # "objects with state_dict/load_state_dict" (olavlm's ResumableLoader)
        def __init__(self):
            self.position = 5

        def state_dict(self):
            return {"position": self.position}

        def load_state_dict(self, state):
            self.position = state["position"]

    def prelude(step):
        return {"run_dir": tmp_path, "model": model, "optimizer": optimizer,
                "scheduler": scheduler, "loader": loader, "step": step}

    loader = Loader()
    ns = _exec(block_id, code, prelude(0))
    assert ns["path"] is None  # a new run folder: nothing to resume
    ns["state"]["extra"] = {"step": 7}  # what the block does on a stop request at step 7
    ns["ckpt"].save(7, ns["state"])
    saved = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.weight.zero_()
    loader.position = 0
    ns = _exec(block_id, code, prelude(0))  # the rerun resumes
    assert ns["step"] == 7 and loader.position == 5
    _close(model.weight, saved["weight"], rtol=0, atol=0)


RUN = {
    "README.md[0]": ("import torch", _run_readme_loss),
    "docs/model.md[1]": ("from olavlm.models import build_tiny", _run_tiny_tower),
    "docs/model.md[2]": ("from olavlm.models.checkpoint_io import", _run_checkpoint_io),
    "docs/ops/embedding_distill_loss.md[1]": ("m = mask.float()", _run_edl_semantics),
    "docs/ops/linear_cross_entropy.md[1]": ("if shift_labels:", _run_lce_semantics),
    "docs/ops/linear_cross_entropy.md[2]": ("model.lm_head = ", _run_lce_hf),
    "docs/ops/perceiver.md[0]": ("from olakernels.perceiver import", _run_perceiver_head),
    "docs/ops/rotary_embedding.md[0]": ("from olakernels import rotary", _run_rope_usage),
    "docs/ops/rotary_embedding.md[1]": ("def rotate_half(x):", _run_rope_semantics),
    "docs/ops/silu_mul.md[0]": ("from olakernels import silu_mul", _run_silu_usage),
    "docs/ops/silu_mul.md[1]": ("y = F.silu(gate) * up", _run_silu_semantics),
    "docs/train.md[0]": ("from olavlm.train.checkpoint import", _run_checkpointer),
}

# ---------------------------------------------------------------------------------- SIGNATURES

SIGNATURES = {
    "docs/ops/embedding_distill_loss.md[0]": ("from olakernels import embedding_distill_loss",
                                              "olakernels:embedding_distill_loss"),
    "docs/ops/linear_cross_entropy.md[0]": ("from olakernels import linear_cross_entropy",
                                            "olakernels:linear_cross_entropy"),
}

# ----------------------------------------------------------------------------------- NOT_RUN

NOT_RUN = {
    "docs/data.md[0]": ("from transformers import AutoTokenizer",
                        "a dataset folder the reader generated, 4 workers and a CUDA device"),
    "docs/model.md[0]": ("from olavlm.models import ModelConfig",
                         "the real Llama-3-8B and CLIP-L folders and a GPU"),
    "docs/ops/perceiver.md[1]": ("lat = proj_in(",
                                 "pseudocode: one head's math (Wq, Wkv: a layer's to_q, to_kv "
                                 "weights; .T of the last two dims)"),
    "docs/teachers.md[0]": ("from olavlm.data import LlavaDataset",
                            "a target cache, teachers' weights and a GPU; `...` stands for "
                            "the LLM forward"),
}


def test_every_block_is_checked():
    listed = {**RUN, **SIGNATURES, **NOT_RUN}
    assert len(listed) == len(RUN) + len(SIGNATURES) + len(NOT_RUN), "a block listed twice"
    unlisted = sorted(set(BLOCKS) - set(listed))
    assert not unlisted, f"python blocks in none of RUN, SIGNATURES, NOT_RUN: {unlisted}"
    stale = sorted(set(listed) - set(BLOCKS))
    assert not stale, f"listed blocks that no longer exist: {stale}"
    moved = [f"{b}: starts {BLOCKS[b][0].lstrip()[:40]!r}" for b, (first, *_) in listed.items()
             if not BLOCKS[b][0].lstrip().startswith(first)]
    assert not moved, f"blocks moved (a block was added or removed before them): {moved}"


def test_embedding_loss_module_as_listed():
    """docs/ops/embedding_distill_loss.md[0]: the module's logit_scale is a (1,) fp32 parameter
    (init 2.0) and the seed's 0-dim value loads into it."""
    from olakernels import EmbeddingDistillLoss

    loss_fn = EmbeddingDistillLoss()
    scale = loss_fn.logit_scale
    assert isinstance(scale, torch.nn.Parameter) and scale.shape == (1,)
    assert scale.dtype == torch.float32 and scale.item() == 2.0
    loss_fn.load_state_dict({"logit_scale": torch.tensor(3.5)})
    assert loss_fn.logit_scale.shape == (1,) and loss_fn.logit_scale.item() == 3.5


@pytest.mark.parametrize("block_id", sorted(RUN))
def test_block_runs(block_id, request):
    run = RUN[block_id][1]
    fixtures = [request.getfixturevalue(name)
                for name in list(inspect.signature(run).parameters)[2:]]
    run(block_id, BLOCKS[block_id][0], *fixtures)


def _listed_signature(code: str, name: str) -> inspect.Signature:
    """The block's ``name(...)`` listing (a call with ``*`` in it) read as a ``def``."""
    start = re.search(rf"\b{name}\(", code).end()
    depth, end = 1, start
    while depth:
        depth += {"(": 1, ")": -1}.get(code[end], 0)
        end += 1
    ns: dict = {}
    exec(f"def {name}({code[start:end - 1]}): pass", ns)  # noqa: S102
    return inspect.signature(ns[name])


@pytest.mark.parametrize("block_id", sorted(SIGNATURES))
def test_signature_listing_matches(block_id):
    module, name = SIGNATURES[block_id][1].split(":")
    real = inspect.signature(getattr(importlib.import_module(module), name))
    listed = _listed_signature(BLOCKS[block_id][0], name)
    want = [(p.name, p.kind, p.default) for p in real.parameters.values()]
    got = [(p.name, p.kind, p.default) for p in listed.parameters.values()]
    assert got == want


def _imported(tree: ast.AST) -> dict:
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name] = importlib.import_module(alias.name)
    return names


def _built_class(value: ast.AST, names: dict):
    """``Cls(...)``, ``Cls(...).cuda()`` or ``.to(...)``: Cls when it is an imported class."""
    while isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and (
            value.func.attr in ("cuda", "to", "cpu", "eval", "train")):
        value = value.func.value
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
        obj = names.get(value.func.id)
        return obj if inspect.isclass(obj) else None
    return None


def _call_problems(code: str) -> list[str]:
    tree = ast.parse(code)
    names, instances, problems = _imported(tree), {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(
                node.targets[0], ast.Name):
            cls = _built_class(node.value, names)
            if cls is not None:
                instances[node.targets[0].id] = cls
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(
                isinstance(a, ast.Starred) for a in node.args) or any(
                k.arg is None for k in node.keywords):
            continue
        func, self_arg = node.func, []
        if isinstance(func, ast.Name) and func.id in names:
            target, what = names[func.id], func.id
        elif isinstance(func, ast.Name) and func.id in instances:
            cls = instances[func.id]
            target = cls.forward if issubclass(cls, torch.nn.Module) else cls.__call__
            what, self_arg = f"{cls.__name__}.forward", [None]
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and (
                func.value.id in instances):
            cls = instances[func.value.id]
            if not hasattr(cls, func.attr):
                problems.append(f"line {node.lineno}: {cls.__name__} has no {func.attr}")
                continue
            target, what = getattr(cls, func.attr), f"{cls.__name__}.{func.attr}"
            self_arg = [] if isinstance(inspect.getattr_static(cls, func.attr),
                                        (staticmethod, classmethod)) else [None]
        else:
            continue
        try:
            inspect.signature(target).bind(*self_arg, *node.args,
                                           **{k.arg: None for k in node.keywords})
        except TypeError as exc:
            problems.append(f"line {node.lineno}: {what}(...): {exc}")
    return problems


@pytest.mark.parametrize("block_id", sorted(NOT_RUN))
def test_unrun_block_names_what_exists(block_id):
    assert not _call_problems(BLOCKS[block_id][0])
