"""Is the SmolLM2-shaped LoRA step's noise Python's GC, or the host's speed? Blocks of steps with the
GC on and off, alternating; GC pause time per step from gc.callbacks; a fixed pure-Python loop timed
before each step as a gauge of the host's speed."""
import gc, json, os, statistics, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, attn_implementation="sdpa",
                  use_cache=False, tie_word_embeddings=True)
torch.manual_seed(0)
with torch.device("cuda"):
    m = LlamaForCausalLM(cfg)
m = m.to(torch.bfloat16)
m.train()
m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
batch = torch.randint(0, 49152, (8, 2048), device="cuda")
pause = [0.0]
t0 = [0.0]
def cb(phase, info):
    if phase == "start":
        t0[0] = time.perf_counter()
    else:
        pause[0] += time.perf_counter() - t0[0]
gc.callbacks.append(cb)

def gauge():
    t = time.perf_counter(); x = 0
    for i in range(200000):
        x += i
    return time.perf_counter() - t

def step():
    torch.cuda.synchronize(); pause[0] = 0.0; t = time.perf_counter()
    loss = m(input_ids=batch, labels=batch).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t, pause[0]

for _ in range(3):
    step()
rows = []
for block in range(8):
    on = block % 2 == 0
    gc.enable() if on else gc.disable()
    for _ in range(15):
        g = gauge()
        s, p = step()
        rows.append({"block": block, "gc": on, "step_s": s, "gc_pause_s": p, "gauge_s": g})
    gc.enable()
for on in (True, False):
    sel = [r for r in rows if r["gc"] == on]
    st = [r["step_s"] * 1e3 for r in sel]
    print(f"gc {'on ' if on else 'off'}: steps {len(st)}, ms median {statistics.median(st):.1f} min {min(st):.1f} max {max(st):.1f} "
          f"sd {statistics.stdev(st):.1f}; gc pause ms per step median {statistics.median(r['gc_pause_s'] for r in sel)*1e3:.2f} "
          f"max {max(r['gc_pause_s'] for r in sel)*1e3:.1f}")
g = [r["gauge_s"] * 1e3 for r in rows]
print(f"host gauge ms: median {statistics.median(g):.2f} min {min(g):.2f} max {max(g):.2f}")
st = [r["step_s"] for r in rows]; gg = [r["gauge_s"] for r in rows]
n = len(st); ms, mg = sum(st) / n, sum(gg) / n
cov = sum((a - ms) * (b - mg) for a, b in zip(st, gg)) / n
corr = cov / ((sum((a - ms) ** 2 for a in st) / n) ** 0.5 * (sum((b - mg) ** 2 for b in gg) / n) ** 0.5)
print(f"correlation of step time with the host gauge: {corr:.2f}")
json.dump(rows, open(os.path.join(os.environ["OUT"], "gc_noise.json"), "w"), indent=1)
