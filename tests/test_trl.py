"""PLoRACallback inside TRL's SFTTrainer (skipped when trl is not installed)."""

import pytest

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def test_sft_trainer_with_plora_callback(tmp_path, tiny_model_dir):
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plora import PLoRACallback, PLoRAConfig
    from plora.checkpoint import STATE_FILE

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(24)]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True,
                         max_length=128)
    callback = PLoRACallback(PLoRAConfig(unload_every=2))
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=LoraConfig(r=4, target_modules="all-linear"),
                             callbacks=[callback])
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "base_layer.weight" in k}
    trainer.train()
    assert [s.step for s in callback.history] == [2, 4, 6]
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the unloads reached the base
    assert (tmp_path / "checkpoint-3" / STATE_FILE).is_file()
    logged = [entry for entry in trainer.state.log_history if "plora/landed_share" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6]
