"""The typed config: each section's constraints and rules, checked once, every problem reported with its
dotted key; the algorithm sections are the core's own classes, checked the same way when built in code."""
import pytest

from nemo_aligner_draft.config import ConfigError, validate


def _minimal(**model):
    return {"trainer": {"draftp_sd": {"max_steps": 1}}, "rm": {"name": "brightness"},
            "model": {"pretrained": "/m", "data": {"train": {"dataset_path": "p.txt"}}, **model}}


def _problems(raw):
    with pytest.raises(ConfigError) as e:
        validate(raw)
    return {p.key: p.message for p in e.value.problems}


@pytest.mark.parametrize("model,key,fragment", [
    (dict(decode_target="latents"), "model.decode_target", "expected one of pred_x0, x0"),
    (dict(kl_coeff=-0.1), "model.kl_coeff", "expected a number >= 0"),
    (dict(lv_copies=-1), "model.lv_copies", "expected an integer >= 0"),
    (dict(truncation_steps=0), "model.truncation_steps", "expected an integer in [1, model.infer.inference_steps=50]"),
    (dict(lv_copies=2, truncation_steps=3), "model.truncation_steps", "expected 1 when model.lv_copies > 0"),
    (dict(family="kandinsky"), "model.family", "expected one of auto, sd, sdxl, flux, sd3"),
    (dict(algorithm="nope"), "model.algorithm", "expected one of draftp, alignprop, ddpo, sdpo, grpo"),
])
def test_model_level_ranges_are_checked_with_their_key(model, key, fragment):
    problems = _problems(_minimal(**model))
    assert key in problems and fragment in problems[key], problems


def test_algorithm_sections_carry_their_own_rules():
    raw = _minimal(algorithm="ddpo", ddpo={"stat_min_count": 8, "stat_buffer_size": 4, "timestep_fraction": 0},
                   infer={"eta": 0.0})
    raw["trainer"] = {"ddpo": {"max_steps": 1}}
    problems = _problems(raw)
    assert "expected <= stat_buffer_size=4" in problems["model.ddpo.stat_min_count"]
    assert problems["model.ddpo.timestep_fraction"] == "got 0.0, expected a number in (0, 1]"
    assert "expected > 0 for DDPO" in problems["model.infer.eta"]


def test_a_section_for_another_algorithm_and_a_missing_own_section():
    raw = _minimal(algorithm="alignprop", ddpo={})
    raw["trainer"] = {"alignprop": {"max_steps": 1}}
    problems = _problems(raw)
    assert problems["model.ddpo"] == "set, but model.algorithm is 'alignprop'"
    assert problems["model.alignprop"] == "missing (model.algorithm=alignprop needs it)"


def test_every_problem_at_once_even_with_unknown_and_mistyped_keys():
    problems = _problems(_minimal(kl_coeff="lots", foo=1, peft={"lora_tuning": {"adapter_dim": 0}},
                                  infer={"height": 100, "inference_steps": "many"}, truncation_steps=11))
    assert set(problems) == {"model.kl_coeff", "model.foo", "model.peft.lora_tuning.adapter_dim",
                             "model.infer.height", "model.infer.inference_steps"}, problems
    # the truncation rule mentions the mistyped inference_steps, so it is left out rather than misreported


def test_core_sections_built_in_code_check_the_same_constraints():
    from nemo_aligner_draft.core.alignprop import AlignPropConfig
    from nemo_aligner_draft.core.ddpo import DDPOConfig
    from nemo_aligner_draft.core.sdpo import SDPOConfig

    with pytest.raises(ValueError, match="stat_min_count: got 8, expected <= stat_buffer_size=4"):
        DDPOConfig(stat_min_count=8, stat_buffer_size=4)
    with pytest.raises(ValueError, match="gamma: got 1.5, expected a number in"):
        SDPOConfig(gamma=1.5)
    with pytest.raises(ValueError, match="cut_min: got 9, expected <= cut_max=3"):
        AlignPropConfig(cut_min=9, cut_max=3)
    assert DDPOConfig(clip_range=0.1).clip_range == 0.1


def test_aliases_map_another_key_name_onto_a_field():
    from dataclasses import dataclass

    from nemo_aligner_draft.typed import Section, setting, validate_tree

    @dataclass
    class Toy(Section):
        rank: int = setting(4, ge=1, aliases=("adapter_dim",))

    tree, problems = validate_tree(Toy, {"adapter_dim": 8})
    assert not problems and tree.rank == 8
    _, problems = validate_tree(Toy, {"adapter_dim": 8, "rank": 2})
    assert problems == [("rank", "given twice: as 'adapter_dim' and as 'rank'")]
    _, problems = validate_tree(Toy, {"adapter_dim": 0})
    assert problems == [("rank", "got 0, expected an integer >= 1")]
