"""PLoRACallback inside a real transformers Trainer, on a tiny random-weight causal LM."""

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from plora import PLoRACallback, PLoRAConfig
from plora.checkpoint import BASE_FILE, STATE_FILE


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=48, length=12, vocab=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def tiny_lora_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def run(tmp_path, max_steps, resume=False, plora_cfg=None, save_steps=4, accum=2, callbacks=None):
    model = tiny_lora_model()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=accum, learning_rate=5e-3, lr_scheduler_type="linear", warmup_steps=2,
        logging_steps=1, save_steps=save_steps, save_strategy="steps", report_to=[], seed=0, data_seed=0,
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )
    cb = PLoRACallback(plora_cfg or PLoRAConfig(unload_every=3, momentum=0.5, lr_strategy="rewarmup", rewarmup_steps=2))
    recorder = Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[recorder, cb] + (callbacks or []))
    trainer.train(resume_from_checkpoint=resume or None)
    return model, cb, recorder


def test_unloads_at_accumulation_boundaries_and_logs_stats(tmp_path):
    model, cb, recorder = run(tmp_path, max_steps=7)
    assert [s.step for s in cb.history] == [3, 6]  # optimizer steps, not micro-batches
    logged = [l for l in recorder.logs if "plora/landed_share" in l]
    assert len(logged) == 2 and all(l["plora/landed_share"] > 0.99 for l in logged)
    # the recorder was registered first; it sees plora's keys only because the callback moved
    # itself before the other callbacks, as reporting integrations need
    assert all("plora/unloads" in l for l in recorder.logs if "loss" in l)
    ckpt = tmp_path / "checkpoint-4"
    assert (ckpt / BASE_FILE).is_file() and (ckpt / STATE_FILE).is_file()


def test_resume_from_checkpoint_gives_the_uninterrupted_weights(tmp_path):
    full, _, _ = run(tmp_path / "full", max_steps=8)
    reference = {k: v.clone() for k, v in full.state_dict().items()}

    class Stop(TrainerCallback):  # simulate a crash right after the step-4 checkpoint
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                control.should_training_stop = True

    run(tmp_path / "cut", max_steps=8, callbacks=[Stop()])
    assert (tmp_path / "cut" / "checkpoint-4").is_dir()
    import shutil
    shutil.rmtree(tmp_path / "cut" / "checkpoint-5", ignore_errors=True)
    resumed, cb, _ = run(tmp_path / "cut", max_steps=8, resume=str(tmp_path / "cut" / "checkpoint-4"))
    assert cb.unloader.num_unloads == 2
    for k, v in resumed.state_dict().items():
        torch.testing.assert_close(v, reference[k], atol=1e-6, rtol=1e-5, msg=k)


def test_resume_without_plora_state_is_refused(tmp_path):
    run(tmp_path, max_steps=4)
    os.remove(tmp_path / "checkpoint-4" / STATE_FILE)
    with pytest.raises(FileNotFoundError, match="no PLoRA state"):
        run(tmp_path, max_steps=6, resume=str(tmp_path / "checkpoint-4"))


def test_stages_come_from_the_trainer_max_steps(tmp_path):
    _, cb, _ = run(tmp_path, max_steps=6, plora_cfg=PLoRAConfig(stages=3))
    assert [s.step for s in cb.history] == [2, 4]
