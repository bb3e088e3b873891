# olavlm.config and olavlm.recipes: typed loading, layering, overrides, errors, the run record.
import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from olavlm.config import (
    CHOICES,
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config_file,
    resolve_config,
    save_resolved_config,
)
from olavlm.models.config import HeadConfig
from olavlm.recipes import RECIPES, get_recipe


# -- recipes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_resolves_and_round_trips(name):
    cfg = resolve_config(name, None, [])
    assert cfg.recipe == name
    data = config_to_dict(cfg)
    json.dumps(data)  # JSON-safe
    assert config_from_dict(data) == cfg
    assert config_from_dict(json.loads(json.dumps(data))) == cfg
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(data))) == cfg


def test_recipe_families_and_aliases():
    stages = ("pt", "vpt", "ift")
    for llm in ("llama3_8b", "phi3_mini"):
        for vision in ("clip", "convnext"):
            for stage in stages:
                assert f"{llm}_{vision}_{stage}" in RECIPES
    for stage in stages:
        alias, full = get_recipe(stage), get_recipe(f"llama3_8b_clip_{stage}")
        alias.recipe = full.recipe
        assert alias == full


@pytest.mark.parametrize("vision", ["clip", "convnext"])
@pytest.mark.parametrize("llm", ["llama3_8b", "phi3_mini"])
def test_llava_recipes_follow_spec_5_1(llm, vision):
    pt, vpt, ift = (get_recipe(f"{llm}_{vision}_{s}") for s in ("pt", "vpt", "ift"))
    assert (pt.optim.lr, vpt.optim.lr, ift.optim.lr) == (1e-3, 2e-5, 2e-5)
    assert (pt.data.batch_size, vpt.data.batch_size, ift.data.batch_size) == (32, 16, 16)
    assert (pt.data.aspect, vpt.data.aspect) == ("square", "pad")
    assert not pt.data.group_by_modality_length and vpt.data.group_by_modality_length
    assert pt.teachers.mode == "online" and pt.teachers.names == "depth,seg,gen"
    assert vpt.teachers.mode == ift.teachers.mode == "none"
    assert [c.train.stage for c in (pt, vpt, ift)] == ["pt", "vpt", "ift"]
    assert vpt.checkpoint.init_from and ift.checkpoint.init_from and not pt.checkpoint.init_from
    # VPT starts from PT; IFT from PT too (finetune.sh), except the one model the seed trained
    # PT+VPT+IFT (SPEC 7: Llama-3-8B + ConvNeXt-XXL), whose IFT starts from VPT.
    assert vpt.checkpoint.init_from.endswith(f"{llm}_{vision}_pt")
    before_ift = "vpt" if (llm, vision) == ("llama3_8b", "convnext") else "pt"
    assert ift.checkpoint.init_from.endswith(f"{llm}_{vision}_{before_ift}")
    for c in (pt, vpt, ift):
        assert (c.optim.schedule, c.optim.warmup_ratio, c.optim.weight_decay) == ("cosine", 0.03,
                                                                                  0.0)
        assert c.optim.betas == (0.9, 0.999) and c.optim.eps == 1e-8
        assert c.parallel.mixed_precision == "bf16"
        assert c.parallel.activation_checkpointing == "selective"
        assert (c.train.epochs, c.train.max_steps) == (1, 0)
        assert c.model.layer_indices == "d18-20_s10-18_g12-20"
        assert c.model.loss_weights == "d0.5_s0.5_g0.5" and c.model.contrastive_weight == 0.3
        assert c.model.aux_mode == "gen-depth-seg" and c.model.num_task_tokens == 8
        assert c.data.template == {"llama3_8b": "llava_llama_3", "phi3_mini": "llava_phi_3"}[llm]
        assert c.model.vision_kind == vision
        assert c.data.image_size == {"clip": None, "convnext": 768}[vision]


def test_demo_heads_match_the_synthetic_teacher():
    from olavlm.teachers.synthetic import SyntheticTeacher

    cfg = get_recipe("demo")
    assert (cfg.model.llm, cfg.model.vision_tower) == ("tiny:llama", "tiny:clip")
    assert cfg.data.path == "" and cfg.teachers.names == "synthetic"
    assert cfg.train.stage == "full" and cfg.parallel.mixed_precision == "fp32"
    shapes = SyntheticTeacher(**cfg.teachers.synthetic).target_shapes()
    assert {t: h.target_shape for t, h in cfg.model.heads.items()} == shapes
    assert all(max(layers) <= 4 for layers in cfg.model.layers_per_task.values())


def test_recipes_import_nothing_heavy():
    # recipes only build dataclasses: importing them adds no module beyond olavlm.config's
    # (which, through olavlm.models' package __init__, currently brings torch itself)
    code = ("import sys, olavlm.config; before = set(sys.modules); import olavlm.recipes; "
            "print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    added = eval(out.stdout)
    assert all(m.startswith("olavlm.recipes") for m in added), added


def test_choices_match_the_code_they_guard():
    from olavlm.data.bad_data import BAD_SAMPLE_POLICIES
    from olavlm.data.images import ASPECTS
    from olavlm.data.llava import MISSING_TARGET_POLICIES
    from olavlm.data.templates import TEMPLATES
    from olavlm.teachers.extract import RESIZE_MODES

    assert set(CHOICES["data.template"]) == set(TEMPLATES)
    assert set(CHOICES["data.aspect"]) == set(ASPECTS)
    assert set(CHOICES["data.on_bad_sample"]) == set(BAD_SAMPLE_POLICIES)
    assert set(CHOICES["teachers.on_missing_target"]) == set(MISSING_TARGET_POLICIES)
    assert set(CHOICES["teachers.resize"]) == set(RESIZE_MODES)
    for path in CHOICES:  # every entry names a real field
        section, key = path.split(".")
        assert hasattr(getattr(Config(), section), key), path


# -- layering: recipe < file < command line ---------------------------------------------------
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_file_then_overrides_win(tmp_path, suffix):
    data = {"optim": {"lr": 5e-4, "grad_accum": 2}, "train": {"max_steps": 7},
            "model": {"heads": {"gen": {"output_dim": 48, "target_shape": [1, 48]}}}}
    path = tmp_path / f"run{suffix}"
    path.write_text(yaml.safe_dump(data) if suffix == ".yaml" else json.dumps(data))
    assert load_config_file(path) == data
    cfg = resolve_config("demo", str(path), ["optim.lr=2e-5", "model.heads.gen.dim_head=16"])
    assert cfg.optim.lr == 2e-5  # CLI over file
    assert cfg.optim.grad_accum == 2 and cfg.train.max_steps == 7  # file over recipe
    assert cfg.checkpoint.every_steps == 100 and cfg.data.synthetic_num == 256  # recipe kept
    gen = cfg.model.heads["gen"]
    assert (gen.output_dim, gen.target_shape, gen.dim_head) == (48, (1, 48), 16)
    assert cfg.model.heads["depth"] == get_recipe("demo").model.heads["depth"]


def test_file_names_the_recipe(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: phi3_mini_clip_vpt\noptim:\n  lr: 1e-5\n")  # YAML reads a str
    cfg = resolve_config(None, str(path), [])
    assert cfg.recipe == "phi3_mini_clip_vpt" and cfg.optim.lr == 1e-5
    assert cfg.data.template == "llava_phi_3"
    assert resolve_config("demo", str(path), []).model.llm == "tiny:llama"  # --recipe wins
    assert resolve_config(None, None, []).recipe == "demo"


def test_yaml_on_off_and_null_mean_what_the_user_wrote(tmp_path):
    """YAML 1.1 reads a bare on/off as a boolean: the documented choices must still work."""
    path = tmp_path / "run.yaml"
    path.write_text("parallel:\n  fsdp: off\noptim:\n  fused: on\ncheckpoint:\n"
                    "  resume: null\n")
    cfg = resolve_config("demo", str(path), [])
    assert (cfg.parallel.fsdp, cfg.optim.fused, cfg.checkpoint.resume) == ("off", "on", None)
    path.write_text("data:\n  template: off\n")  # no on/off among its choices: still an error
    with pytest.raises(ValueError, match="data.template"):
        resolve_config("demo", str(path), [])
    with pytest.raises(ValueError, match="data.synthetic_size"):  # the scenes need >= 32 px
        resolve_config("demo", None, ["data.synthetic_size=16"])


def test_overrides_parse_values():
    out = apply_overrides({"optim": {"lr": 1.0}}, [
        "optim.lr=2e-5", "model.layer_indices=d18-20_s10-18_g12-20",
        "model.heads.gen.output_dim=512", "optim.betas=[0.9,0.95]", "train.run_name=null",
        "logging.wandb=true", "model.llm=/w/llama=3", 'model.loss_weights={"gen": 1.0}'])
    assert out == {
        "optim": {"lr": 2e-5, "betas": [0.9, 0.95]},
        "model": {"layer_indices": "d18-20_s10-18_g12-20", "heads": {"gen": {"output_dim": 512}},
                  "llm": "/w/llama=3", "loss_weights": {"gen": 1.0}},
        "train": {"run_name": None}, "logging": {"wandb": True}}


def test_overrides_reach_typed_fields():
    cfg = resolve_config("pt", None, [
        "optim.betas=[0.9,0.95]", "train.run_name=2024", "model.num_task_tokens=4",
        "model.layer_indices={\"depth\": [18], \"seg\": [10], \"gen\": [12]}",
        "teachers.weights.depth=/w/dav2", "model.heads.seg.target_shape=[1536,24,24]",
        "data.image_size=null"])
    assert cfg.optim.betas == (0.9, 0.95) and cfg.train.run_name == "2024"
    assert cfg.model.layers_per_task == {"gen": [12], "depth": [18], "seg": [10]}
    assert cfg.teachers.weights["depth"] == "/w/dav2"
    assert isinstance(cfg.model.heads["seg"], HeadConfig)
    assert cfg.model.heads["seg"].target_shape == (1536, 24, 24)


def test_strings_parse_for_numbers_and_ints_for_floats():
    cfg = config_from_dict({"optim": {"lr": "1e-3", "grad_clip": 2, "grad_accum": "4"},
                            "logging": {"wandb": "false"}})
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.optim.grad_accum == 4 and cfg.logging.wandb is False


# -- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("data, message", [
    ({"optm": {}}, "unknown config key 'optm' (did you mean 'optim'?); valid keys at the top "
                   "level: recipe, model, data"),
    ({"lr": 1e-3}, "unknown config key 'lr' (did you mean 'optim.lr'?)"),
    ({"optim": {"lrr": 1}}, "unknown config key 'optim.lrr' (did you mean 'optim.lr'?); valid "
                            "keys in optim: lr, projector_lr"),
    ({"optim": {"stage": "pt"}}, "unknown config key 'optim.stage' (did you mean "
                                 "'train.stage'?)"),
    ({"model": {"heads": {"gen": {"num_queries": 1, "output_dim": 8, "target_shape": [1, 8],
                                  "dimhead": 8}}}},
     "unknown config key 'model.heads.gen.dimhead' (did you mean 'model.heads.gen.dim_head'?)"),
    ({"model": {"heads": {"genn": {}}}}, "unknown key 'model.heads.genn' (did you mean "
                                         "'model.heads.gen'?); valid keys in model.heads: gen"),
    ({"teachers": {"synthetic": {"grd": 4}}}, "unknown key 'teachers.synthetic.grd' (did you "
                                              "mean 'teachers.synthetic.grid'?)"),
    ({"optim": {"lr": "abc"}}, "optim.lr: expected float, got 'abc' (str)"),
    ({"train": {"max_steps": True}}, "train.max_steps: expected int, got True (bool)"),
    ({"train": {"max_steps": 2.5}}, "train.max_steps: expected int, got 2.5 (float)"),
    ({"logging": {"wandb": 1}}, "logging.wandb: expected bool, got 1 (int)"),
    ({"train": {"run_name": 3.5}}, "train.run_name: expected str | None, got 3.5 (float)"),
    ({"optim": {"betas": [0.9]}}, "optim.betas: expected tuple[float, float] (a list of 2), "
                                  "got [0.9] (list)"),
    ({"optim": {"betas": [0.9, "x"]}}, "optim.betas[1]: expected float, got 'x' (str)"),
    ({"optim": 3}, "optim: expected a mapping of OptimConfig keys, got 3 (int)"),
    ({"model": {"layer_indices": [1, 2]}}, "model.layer_indices: expected str | dict"),
    ({"model": {"heads": {"gen": {"output_dim": 8}}}},
     "model.heads.gen: missing required keys ['num_queries', 'target_shape']"),
    ({"model": {"heads": {"gen": {"num_queries": 1, "output_dim": 8, "target_shape": "1x8"}}}},
     "model.heads.gen.target_shape: expected tuple[int, ...] (a list), got '1x8' (str)"),
    ({"train": {"stage": "sft"}}, "train.stage: expected one of pt, vpt, ift, full, got 'sft'"),
    ({"parallel": {"activation_checkpointing": "partial"}},
     "parallel.activation_checkpointing: expected one of none, selective, full"),
    ({"parallel": {"float8": "on"}}, "parallel.float8: expected one of none, tensorwise, rowwise"),
    ({"parallel": {"fsdp": "yes"}}, "parallel.fsdp: expected one of auto, on, off"),
    ({"parallel": {"mixed_precision": "fp16"}}, "parallel.mixed_precision: expected one of"),
    ({"parallel": {"load": "rank_0"}}, "parallel.load: expected one of rank0, every_rank, got "
                                       "'rank_0' (did you mean 'rank0'?)"),
    ({"teachers": {"mode": "offline"}}, "teachers.mode: expected one of online, cache, none"),
    ({"optim": {"schedule": "linear"}}, "optim.schedule: expected one of cosine, constant"),
    ({"optim": {"warmup_ratio": 1.5}}, "optim.warmup_ratio: expected a value in [0.0, 1.0]"),
    ({"data": {"batch_size": 0}}, "data.batch_size: expected a value >= 1, got 0"),
    ({"teachers": {"mode": "cache"}}, "teachers.mode: 'cache' needs teachers.cache_dir"),
    ({"model": {"num_task_tokens": 5}}, "model: ModelConfig.heads['depth'].num_queries (576) "
                                        "must be a multiple of num_task_tokens (5)"),
    ({"model": {"num_task_tokens": 0}}, "model.num_task_tokens: expected a value >= 1, got 0"),
    ({"model": {"contrastive_weight": -3}}, "model.contrastive_weight: expected a value >= 0.0"),
    ({"optim": {"lr": float("inf")}}, "optim.lr: expected a finite number, got inf"),
    ({"optim": {"eps": float("nan")}}, "optim.eps: expected a finite number, got nan"),
    ({"optim": {"betas": [1.5, 2]}}, "optim.betas: expected two values in [0, 1), got [1.5, 2"),
    ({"optim": {"betas": [0.9, float("inf")]}}, "optim.betas: expected a finite number"),
])
def test_bad_config_is_rejected(data, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        config_from_dict(data)
    assert type(info.value) is ValueError


def test_resume_is_free_form():
    assert config_from_dict({"checkpoint": {"resume": "/runs/x/step_100"}}).checkpoint.resume \
        == "/runs/x/step_100"


@pytest.mark.parametrize("item", ["optim.lr", "=1", "optim..lr=1", ".lr=1", "optim.lr.=1"])
def test_malformed_override(item):
    with pytest.raises(ValueError, match=re.escape(f"malformed override {item!r}")):
        apply_overrides({}, [item])


def test_override_through_a_value():
    with pytest.raises(ValueError, match=re.escape("override 'optim.lr.x=1': optim.lr is not a "
                                                   "section")):
        apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr.x=1"])


def test_unknown_override_key_is_rejected_with_its_path():
    with pytest.raises(ValueError, match=re.escape("'optim.lrate' (did you mean 'optim.lr")):
        resolve_config("demo", None, ["optim.lrate=1e-4"])


def test_a_key_in_the_wrong_section_points_to_the_exact_one_before_a_near_spelling():
    with pytest.raises(ValueError, match=re.escape("'optim.max_steps' (did you mean "
                                                   "'train.max_steps'?)")):
        resolve_config("demo", None, ["optim.max_steps=5"])


def test_unknown_recipe():
    with pytest.raises(ValueError, match=r"unknown recipe 'ptt' \(did you mean 'pt'\?\); "
                                         r"recipes are: demo, llama3_8b_clip_pt"):
        resolve_config("ptt", None, [])
    with pytest.raises(ValueError, match=r"unknown recipe 'PT' \(did you mean 'pt'\?\)"):
        resolve_config("PT", None, [])
    with pytest.raises(ValueError, match=r"malformed override 'pt': .* \(the recipe\? "
                                         r"--recipe pt\)"):
        resolve_config(None, None, ["pt"])


@pytest.mark.parametrize("override,message", [
    ("model.smooth_l1_beta=-1", "model.smooth_l1_beta: expected a value >= 0.0, got -1.0"),
    ("model.num_sys_tokens=-5", "model.num_sys_tokens: expected a value >= 0, got -5"),
    ("model.projector=foo", "model.projector: expected mlp2x_gelu (the seed's), mlpNx_gelu "
                            "with N >= 1, or linear, got 'foo'"),
    ("train.run_name=../x", "train.run_name: expected a folder inside train.output_dir (a "
                            "name or a relative path such as exp/a, without '.' or '..'), "
                            "got '../x'"),
    ("train.run_name=.", "got '.'"),
    ("train.run_name=", "got ''"),
    ("train.run_name=/tmp/abs", "got '/tmp/abs'"),
    ("train.run_name=exp/../x", "got 'exp/../x'"),
    ("optim.projector_lr=None", "optim.projector_lr: expected float | None (write null for "
                                "None), got 'None' (str)"),
])
def test_values_that_would_fail_later_are_refused_with_their_key(override, message):
    """Each failed only at the first step (a traceback), or trained outside output_dir."""
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_config("demo", None, [override])
    assert resolve_config("demo", None, ["model.projector=mlp3x_gelu"]).model.projector
    assert resolve_config("demo", None, ["train.run_name=exp/a"]).train.run_name == "exp/a"


def test_config_file_errors_name_the_file(tmp_path):
    cases = {"loop.yaml": (b"optim:\n  betas: &x [*x]\n", "a YAML alias refers to itself"),
             "latin.yaml": (b"optim:\n  lr: 0.1 # caf\xe9\n", "is not UTF-8 text"),
             "typo.yaml": (b"optim:\n  lrr: 1\n", "unknown config key 'optim.lrr' (did you "
                                                   "mean 'optim.lr'?)")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(f"config file "
                                                       f"{str(tmp_path / name)!r}")) as raised:
            resolve_config("demo", str(tmp_path / name), [])
        assert message in str(raised.value)
    shared = tmp_path / "shared.yaml"  # aliases shared 12 levels deep: no cycle, and quick
    lines = ["a0: &a0 {x: 1}"] + [f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * 10)}]"
                                  for k in range(1, 13)]
    shared.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    assert set(load_config_file(shared)) == {f"a{k}" for k in range(13)}
    assert time.perf_counter() - start < 5  # (each shared node walked once, not 10^12 times)
    with pytest.raises(ValueError, match="is a folder; expected a .yaml, .yml or .json file"):
        resolve_config("demo", str(tmp_path), [])
    bom = tmp_path / "bom.json"  # a leading byte-order mark, as some editors write
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"optim": {"lr": 0.5}}).encode())
    assert resolve_config("demo", str(bom), []).optim.lr == 0.5


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        resolve_config("demo", str(tmp_path / "nope.yaml"), [])
    bad = tmp_path / "run.toml"
    bad.write_text("x = 1")
    with pytest.raises(ValueError, match=r"expected a \.yaml, \.yml or \.json file"):
        load_config_file(bad)
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping of sections"):
        load_config_file(bad)
    bad = tmp_path / "broken.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_config_file(bad)
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    assert load_config_file(empty) == {}


# -- the run record ---------------------------------------------------------------------------
def test_save_resolved_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cfg = resolve_config("phi3_mini_convnext_pt", None, ["optim.lr=3e-4"])
    config_path, env_path = save_resolved_config(cfg, tmp_path / "run")
    assert config_path == tmp_path / "run" / "config.yaml"
    assert resolve_config(None, str(config_path), []) == cfg  # reloads to the same run
    env = json.loads(env_path.read_text())
    for key in ("python", "versions", "git_sha", "hostname", "devices", "num_devices",
                "world_size", "rank", "argv", "time_utc"):
        assert key in env, key
    assert {"torch", "triton", "transformers"} <= set(env["versions"])
    assert (env["world_size"], env["rank"]) == (2, 1)
    assert env["argv"] == sys.argv
    assert env["devices"] == "cpu" or isinstance(env["devices"], list)


def test_save_without_yaml_writes_json(tmp_path, monkeypatch):
    import olavlm.config as config

    monkeypatch.setattr(config, "_yaml", lambda: None)
    config_path, _ = save_resolved_config(get_recipe("demo"), tmp_path)
    assert config_path.name == "config.json"
    assert config_from_dict(json.loads(config_path.read_text())) == get_recipe("demo")


def test_keep_last_zero_keeps_every_checkpoint_as_documented():
    assert config_from_dict({"checkpoint": {"keep_last": 0}}).checkpoint.keep_last == 0


def test_a_saved_config_replays_as_the_config_that_ran(tmp_path):
    """Mappings an override replaced whole (emptied, or narrowed to one key) stay replaced when
    the saved config.yaml is replayed: a file that sets every key is taken as is."""
    ran = resolve_config("demo", None, ["teachers.synthetic={}", "teachers.weights={}",
                                        "model.heads={}", "model.layer_indices={}",
                                        "model.aux_mode="])
    path, _ = save_resolved_config(ran, tmp_path / "run")
    assert resolve_config(None, str(path), []) == ran
    narrowed = resolve_config("demo", None, ['teachers.synthetic={"depth_dim": 4}'])
    assert narrowed.teachers.synthetic == {"depth_dim": 4}
    path, _ = save_resolved_config(narrowed, tmp_path / "run2")
    assert resolve_config(None, str(path), []) == narrowed


def test_a_recipe_override_picks_the_recipe_it_names():
    """`recipe=NAME` among the overrides starts from NAME's defaults, as --recipe does (it
    used to rename the run and keep the demo's values); two different recipes are refused."""
    cfg = resolve_config(None, None, ["recipe=phi3_mini_clip_vpt", "optim.lr=1e-5"])
    assert cfg == resolve_config("phi3_mini_clip_vpt", None, ["optim.lr=1e-5"])
    assert resolve_config("pt", None, ["recipe=pt"]).recipe == "pt"
    with pytest.raises(ValueError, match="recipe given twice: --recipe demo and the override "
                                         "recipe=pt"):
        resolve_config("demo", None, ["recipe=pt"])
    with pytest.raises(ValueError, match="expected recipe=NAME"):
        resolve_config(None, None, ["recipe="])
    assert resolve_config(None, None, ['recipe="pt"']).recipe == "pt"  # JSON, as any value
    with pytest.raises(ValueError, match="expected recipe=NAME"):
        resolve_config(None, None, ["recipe=3"])


def test_a_saved_config_under_another_recipe_name_is_refused(tmp_path):
    """A run's complete saved config replays as is: --recipe (or recipe=) naming another
    recipe would only relabel it (the demo's values recorded as "pt"), so it is refused. A
    partial file's keys go over the named recipe's defaults (test_file_names_the_recipe)."""
    saved, _ = save_resolved_config(resolve_config("demo", None, []), tmp_path / "run")
    for recipe, overrides, how in (("pt", [], "--recipe pt"),
                                   (None, ["recipe=pt"], "the override recipe=pt")):
        with pytest.raises(ValueError, match=rf"recipe given twice: {how} and recipe: 'demo' in "
                                             rf"--config .*complete saved config.*relabel"):
            resolve_config(recipe, str(saved), overrides)
    assert resolve_config("demo", str(saved), []).recipe == "demo"  # the same name is fine


def test_a_partial_file_merges_into_mappings_and_empty_ones_empty_them(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("teachers:\n  synthetic: {seed: 3}\n")
    demo = get_recipe("demo").teachers.synthetic
    assert resolve_config("demo", str(path), []).teachers.synthetic == {**demo, "seed": 3}
    path.write_text("teachers:\n  synthetic: {}\n")
    assert resolve_config("demo", str(path), []).teachers.synthetic == {}


def test_numbers_in_untyped_mappings_dump(tmp_path):
    """Numbers read from a file or an override into a mapping field (model.loss_weights) are
    plain numbers in the Config: the run's config.yaml dumps (it raised RepresenterError)."""
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  loss_weights: {depth: 0.5, seg: 0.25, gen: 1}\n")
    cfg = resolve_config("demo", str(path), ["model.loss_weights.seg=0.3"])
    assert cfg.model.loss_weights == {"depth": 0.5, "seg": 0.3, "gen": 1}
    assert all(type(v) in (int, float) for v in cfg.model.loss_weights.values())
    saved, _ = save_resolved_config(cfg, tmp_path / "run")
    assert resolve_config(None, str(saved), []) == cfg


@pytest.mark.parametrize("text", ["007", "2024_01", "0x1F", "12:30", "1.50", "1e3"])
def test_a_run_name_is_kept_as_written(tmp_path, text):
    """A str field written as a number keeps its spelling (YAML 1.1 reads 007 as 7, 2024_01 as
    202401, 12:30 as 750), in a file and as an override."""
    path = tmp_path / "run.yaml"
    path.write_text(f"train:\n  run_name: {text}\n")
    assert resolve_config("demo", str(path), []).train.run_name == text
    assert resolve_config("demo", None, [f"train.run_name={text}"]).train.run_name == text


def test_an_integral_float_string_is_taken_for_an_int(tmp_path):
    """YAML reads `1e3` (no dot) as a string: an int field takes it as 1000, as the override
    `train.max_steps=1e3` does; a fractional one is still refused."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_steps: 1e3\n")
    assert resolve_config("demo", str(path), []).train.max_steps == 1000
    assert resolve_config("demo", None, ["train.max_steps=1e3"]).train.max_steps == 1000
    cfg = resolve_config("demo", str(path), [])
    assert type(cfg.train.max_steps) is int
    with pytest.raises(ValueError, match="train.max_steps: expected int"):
        resolve_config("demo", None, ["train.max_steps=2.5"])
    path.write_text("train:\n  max_steps: 2.5e0\n")
    with pytest.raises(ValueError, match="train.max_steps: expected int"):
        resolve_config("demo", str(path), [])


def test_a_config_saved_before_a_key_was_added_still_replays_as_is(tmp_path):
    """A config.yaml written before `teachers.resize` existed is still a run's complete saved
    config: narrowed mappings stay narrowed (they were refilled from the recipe), the new key
    takes its default, and another recipe name is refused as for any saved config."""
    from olavlm.config import ADDED_KEYS, load_config_file

    narrowed = resolve_config("demo", None, ['teachers.synthetic={"depth_dim": 4}'])
    path, _ = save_resolved_config(narrowed, tmp_path / "run")
    data = load_config_file(path)
    for key in ADDED_KEYS:
        section, name = key.split(".")
        del data[section][name]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    replayed = resolve_config(None, str(old), [])
    assert replayed == narrowed and replayed.teachers.synthetic == {"depth_dim": 4}
    with pytest.raises(ValueError, match="complete saved config"):
        resolve_config("pt", str(old), [])


def test_resuming_a_run_saved_before_a_key_was_added_warns_about_nothing(tmp_path, caplog):
    """The folder's config.yaml lacks a key added since (at its default now): resuming lists
    no change for it; a real change is still listed."""
    from olavlm.config import ADDED_KEYS, load_config_file
    from olavlm.train.trainer import _warn_changed_config

    cfg = resolve_config("demo", None, [])
    path, _ = save_resolved_config(cfg, tmp_path)
    data = load_config_file(path)
    for key in ADDED_KEYS:
        section, name = key.split(".")
        del data[section][name]
    path.unlink()
    (tmp_path / "config.json").write_text(json.dumps(data))
    with caplog.at_level("WARNING", logger="olavlm.train"):
        _warn_changed_config(tmp_path, cfg)
    assert "differs" not in caplog.text
    with caplog.at_level("WARNING", logger="olavlm.train"):
        _warn_changed_config(tmp_path, resolve_config("demo", None, ["optim.lr=5e-4"]))
    assert "optim.lr: 0.001 -> 0.0005" in caplog.text and "resize" not in caplog.text


# Every key a run's config.yaml held when saved configs were first written (a key added since
# belongs in ADDED_KEYS, or older saved configs stop replaying as complete).
FIRST_SAVED_KEYS = frozenset({
    "checkpoint.at_end", "checkpoint.every_steps", "checkpoint.init_from", "checkpoint.keep_last",
    "checkpoint.resume", "data.aspect", "data.batch_size", "data.group_by_modality_length",
    "data.image_folder", "data.image_size", "data.max_reject_fraction", "data.num_workers",
    "data.on_bad_sample", "data.path", "data.shuffle", "data.synthetic_dir", "data.synthetic_num",
    "data.synthetic_size", "data.template", "data.tokenizer", "logging.every_steps",
    "logging.jsonl", "logging.plot", "logging.progress", "logging.tensorboard", "logging.wandb",
    "logging.wandb_project", "model.attn_implementation", "model.aux_mode",
    "model.contrastive_weight", "model.dtype", "model.fused_rope", "model.heads", "model.impl",
    "model.layer_indices", "model.lean_mlp", "model.lean_norm", "model.llm",
    "model.logit_scale_init", "model.loss_weights", "model.max_length", "model.num_sys_tokens",
    "model.num_task_tokens", "model.pass_text_to_aux", "model.projector", "model.seed_compat",
    "model.smooth_l1_beta", "model.trainable_dtype", "model.vision_kind",
    "model.vision_select_layer", "model.vision_tower", "optim.betas", "optim.eps", "optim.fused",
    "optim.grad_accum", "optim.grad_clip", "optim.head_lr", "optim.lr", "optim.projector_lr",
    "optim.schedule", "optim.warmup_ratio", "optim.weight_decay",
    "parallel.activation_checkpointing", "parallel.backend", "parallel.compile",
    "parallel.float8", "parallel.fsdp", "parallel.liger", "parallel.load",
    "parallel.mixed_precision", "parallel.reduce_dtype", "parallel.sdpa_backend", "parallel.tf32",
    "teachers.cache_dir", "teachers.compile", "teachers.mode", "teachers.names",
    "teachers.on_missing_target", "teachers.side_stream", "teachers.synthetic",
    "teachers.weights", "train.device", "train.epochs", "train.max_steps",
    "train.nonfinite_limit", "train.output_dir", "train.run_name", "train.seed", "train.stage",
})


def test_every_key_added_since_configs_were_first_saved_is_in_added_keys():
    from olavlm.config import ADDED_KEYS, config_to_dict

    data = config_to_dict(Config())
    keys = {f"{s}.{k}" for s, v in data.items() if isinstance(v, dict) for k in v}
    assert keys - FIRST_SAVED_KEYS <= ADDED_KEYS, (
        f"new config keys {sorted(keys - FIRST_SAVED_KEYS - ADDED_KEYS)}: add them to "
        "olavlm.config.ADDED_KEYS")
    assert FIRST_SAVED_KEYS <= keys  # (a removed key: saved configs name it; handle it)
