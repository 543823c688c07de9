"""LoRA adapters merged through their exact ΔW, and merged updates re-factored to LoRA by SVD."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from medmerge.config import MergeConfig
from medmerge.merge import merge_models
from medmerge.merge.lora import factor
from medmerge.merge.tensors import folder_tensors, read_tensor


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {n: read_tensor(i) for n, i in folder_tensors(folder).items()}


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("which", [0, 1], ids=["lora", "rslora"])
def test_single_adapter_equals_peft_merge_and_unload(tmp_path, tiny_llama, adapters, which):
    config = MergeConfig(method="linear", base_model=str(tiny_llama), models=[{"path": str(adapters[which])}])
    out = merge_models(config, tmp_path / "merged", progress=False)
    ours, peft = _weights(out), _peft_merged(tiny_llama, adapters[which])
    changed = 0
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, peft[name], atol=1e-6, rtol=1e-6)
        changed += int(not torch.equal(tensor, _weights(tiny_llama)[name]))
    assert changed == 3 * 2  # q, v, down in 2 layers


def test_two_adapters_are_merged_through_delta_w_like_peft_cat(tmp_path, tiny_llama, adapters):
    """Task arithmetic of adapters = base + Σ w_i ΔW_i, which PEFT's add_weighted_adapter 'cat' also gives."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    weights = [0.6, 0.9]
    config = MergeConfig(
        method="task_arithmetic",
        base_model=str(tiny_llama),
        models=[{"path": str(a), "weight": w} for a, w in zip(adapters, weights, strict=True)],
    )
    ours = _weights(merge_models(config, tmp_path / "ta", progress=False))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapters[0], "a")
    model.load_adapter(adapters[1], "b")
    model.add_weighted_adapter(["a", "b"], weights, "ab", combination_type="cat")
    model.set_adapter("ab")
    merged = model.merge_and_unload(adapter_names=["ab"])
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=1e-5)


def test_factor_is_the_best_rank_k_approximation():
    torch.manual_seed(0)
    delta = torch.randn(20, 3) @ torch.randn(3, 15)  # rank 3
    exact = factor(delta, 3)
    torch.testing.assert_close(exact.b @ exact.a, delta, atol=1e-5, rtol=1e-5)
    assert exact.relative_error < 1e-6
    cut = factor(delta, 1)
    s = torch.linalg.svdvals(delta.double())
    assert cut.relative_error == pytest.approx(math.sqrt(float(s[1:].square().sum() / s.square().sum())))
    measured = float((delta - cut.b @ cut.a).norm() / delta.norm())
    assert cut.relative_error == pytest.approx(measured, rel=1e-4)


def test_lora_output_roundtrips_through_peft(tmp_path, tiny_llama, adapters):
    """Two adapters (ranks 4 and 2) merged to a rank-6 LoRA: exact; to rank 1: truncation error reported."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models = [{"path": str(a), "weight": w} for a, w in zip(adapters, [1.0, 0.5], strict=True)]
    full = _weights(
        merge_models(
            MergeConfig(method="task_arithmetic", base_model=str(tiny_llama), models=models),
            tmp_path / "full",
            progress=False,
        )
    )
    config = MergeConfig(
        method="task_arithmetic", base_model=str(tiny_llama), models=models, output="lora", rank=6
    )
    out = merge_models(config, tmp_path / "lora6", progress=False)
    manifest = json.loads((out / "merge.json").read_text())
    assert manifest["lora"]["modules"] == 6
    assert manifest["lora"]["max_svd_relative_error"] < 1e-5
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), out
    ).merge_and_unload()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, full[name], atol=1e-5, rtol=1e-5)

    low = merge_models(config.model_copy(update={"rank": 1}), tmp_path / "lora1", progress=False)
    stats = json.loads((low / "merge.json").read_text())["tensors"].values()
    errors = [s["svd_relative_error"] for s in stats if "svd_relative_error" in s]
    assert len(errors) == 6 and min(errors) > 0.01


def test_dora_adapters_are_refused(tmp_path, tiny_llama, adapters):
    import shutil

    from medmerge.errors import MedmergeError

    dora = tmp_path / "dora"
    shutil.copytree(adapters[0], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(MedmergeError, match="DoRA"):
        merge_models(
            MergeConfig(method="linear", base_model=str(tiny_llama), models=[str(dora)]),
            tmp_path / "out",
            progress=False,
        )


def test_base_model_defaults_to_the_adapters_base(tmp_path, tiny_llama, adapters):
    config = MergeConfig(method="linear", models=[str(adapters[0])])  # no base_model
    ours = _weights(merge_models(config, tmp_path / "merged", progress=False))
    peft = _peft_merged(tiny_llama, adapters[0])
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, peft[name], atol=1e-6, rtol=1e-6)
