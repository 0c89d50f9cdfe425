"""The trainer: LoRA (PEFT) or full fine-tuning of the transformer layers on CPU or GPU.

Loss is computed only where there are labels (the answers), so the 262k-row output layer runs
for a handful of positions per example instead of every prompt token. Checkpoints are written
to a temporary directory and renamed, once per epoch; a restarted job resumes from the newest.
The reporter is asked once per step whether to go on, so a cancel stops within one step."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bastion.finetune.encode import IGNORE, ChatTokenizer, encode
from bastion.finetune.failures import TrainingError

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Stopped(Exception):
    """The reporter asked training to stop (cancelled, claim lost, worker shutting down)."""


class Reporter(Protocol):
    def keep_going(self, step: int, total: int, tokens: int) -> bool: ...

    def message(self, text: str, *, data: dict[str, Any] | None = None) -> None: ...

    def metrics(self, data: dict[str, Any]) -> None: ...

    def checkpoint(self, step: int, metrics: dict[str, float], path: Path) -> None: ...


@dataclass
class TrainSpec:
    base_gguf: Path
    training: Path
    validation: Path | None
    method: str  # "lora" or "full"
    hyperparameters: dict[str, Any]
    seed: int
    workdir: Path
    threads: int | None = None
    cache_root: Path | None = None  # where the base's PyTorch copy goes if not beside its GGUF


@dataclass
class TrainResult:
    trained_tokens: int
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    adapter: Path | None = None  # lora: a GGUF adapter; full: a whole GGUF model


def read_examples(path: Path, tok: ChatTokenizer) -> list[tuple[list[int], list[int]]]:
    """A file that passed validation; an example the chat template cannot split into turns
    is the tenant's to fix, and says which line it is."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    out.append(encode(json.loads(line), tok))
                except ValueError as exc:
                    raise TrainingError(f"line {number} of the training data: {exc}") from exc
    return out


class _Model:
    """The pieces the loss needs, whether or not PEFT wraps the model."""

    def __init__(self, model: Any, wrapped: Any) -> None:
        self.wrapped = wrapped
        self.core = model.model
        self.lm_head = model.lm_head
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def loss(self, batch: list[tuple[list[int], list[int]]]) -> tuple[Any, int, int]:
        import torch
        import torch.nn.functional as F

        width = max(len(ids) for ids, _ in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (i, lab) in enumerate(batch):
            ids[row, :len(i)] = torch.tensor(i)
            labels[row, :len(lab)] = torch.tensor(lab)
            mask[row, :len(i)] = 1
        hidden = self.core(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        target = labels[:, 1:]
        picked = target != IGNORE
        logits = self.lm_head(hidden[:, :-1][picked])
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        gold = target[picked]
        loss = F.cross_entropy(logits.float(), gold)
        correct = int((logits.argmax(-1) == gold).sum())
        return loss, int(gold.numel()), correct


def _evaluate(model: _Model, data: list[tuple[list[int], list[int]]],
              batch_size: int) -> tuple[float, float]:
    import torch

    total = n = correct = 0.0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            loss, count, ok = model.loss(data[i:i + batch_size])
            total += float(loss) * count
            n += count
            correct += ok
    return total / max(n, 1), correct / max(n, 1)


def _latest_checkpoint(workdir: Path) -> Path | None:
    done = sorted(p for p in (workdir / "checkpoints").glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def _save_checkpoint(workdir: Path, step: int, params: dict[str, Any], optimizer: Any,
                     state: dict[str, Any], keep_only_latest: bool = False) -> Path:
    from safetensors.torch import save_file

    final = workdir / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in params.items()}, tmp / "weights.safetensors")
    opt: dict[str, Any] = {}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            opt[f"{name}::{key}"] = value.detach().reshape(-1) if value.dim() == 0 else value.detach()
    save_file({k: v.contiguous() for k, v in opt.items()}, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep_only_latest:  # full training: each checkpoint holds every weight and Adam state
        for older in (workdir / "checkpoints").glob("step-*"):
            if older != final and not older.name.endswith(".partial"):
                shutil.rmtree(older, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, params: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    weights = load_file(path / "weights.safetensors")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    opt = load_file(path / "optimizer.safetensors")
    for name, p in params.items():
        state = {key.split("::", 1)[1]: value for key, value in opt.items()
                 if key.split("::", 1)[0] == name}
        if "step" in state:
            state["step"] = state["step"].reshape(())
        if state:
            optimizer.state[p] = state
    return json.loads((path / "state.json").read_text())


def train(spec: TrainSpec, reporter: Reporter) -> TrainResult:
    import torch

    torch.manual_seed(spec.seed)
    # Half the cores by default: the server's llama.cpp threads share the machine, and
    # oversubscribed OpenMP threads spin-wait (5-10x slower steps measured on 2 busy cores).
    torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 2) // 2))
    hp = spec.hyperparameters
    tok = ChatTokenizer.load(spec.base_gguf)
    data = read_examples(spec.training, tok)
    valid = read_examples(spec.validation, tok) if spec.validation else []
    tok.model.close()

    from bastion.finetune.base_weights import load_base

    started = time.monotonic()
    base = load_base(spec.base_gguf, spec.cache_root)
    base.config.use_cache = False
    if spec.method == "lora":
        from peft import LoraConfig, get_peft_model

        wrapped = get_peft_model(base, LoraConfig(
            r=int(hp["lora_rank"]), lora_alpha=float(hp["lora_alpha"]), lora_dropout=0.0,
            target_modules=LORA_TARGETS, bias="none"))
        model = _Model(wrapped.get_base_model(), wrapped)
    else:
        for name, p in base.named_parameters():
            p.requires_grad = ".layers." in name  # embeddings (tied to the output) stay frozen
        model = _Model(base, base)
    params = {n: p for n, p in model.wrapped.named_parameters() if p.requires_grad}
    lr = float(hp["learning_rate"])
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    reporter.message(f"Base model loaded in {time.monotonic() - started:.1f}s; training "
                     f"{sum(p.numel() for p in params.values()):,} parameters ({spec.method})")

    batch_size = int(hp["batch_size"])
    per_epoch = math.ceil(len(data) / batch_size)
    total = per_epoch * int(hp["n_epochs"])
    step, tokens = 0, 0
    resume = _latest_checkpoint(spec.workdir)
    if resume is not None:
        state = _load_checkpoint(resume, params, optimizer)
        step, tokens = state["step"], state["tokens"]
        reporter.message(f"Resuming from the checkpoint at step {step}")
    elif valid:
        loss, acc = _evaluate(model, valid, batch_size)
        reporter.metrics({"step": 0, "total_steps": total, "valid_loss": loss,
                          "full_valid_loss": loss, "full_valid_mean_token_accuracy": acc})
    metrics: dict[str, float] = {}
    model.wrapped.train()
    while step < total:
        epoch, index = divmod(step, per_epoch)
        order = list(range(len(data)))
        random.Random(spec.seed + epoch).shuffle(order)
        batch = [data[i] for i in order[index * batch_size:(index + 1) * batch_size]]
        for group in optimizer.param_groups:
            group["lr"] = lr * (1.0 - 0.9 * step / total)  # linear decay to a tenth
        loss, count, correct = model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += sum(len(ids) for ids, _ in batch)
        metrics = {"step": step, "total_steps": total, "train_loss": float(loss.detach()),
                   "train_mean_token_accuracy": correct / max(count, 1)}
        end_of_epoch = step % per_epoch == 0 or step == total
        if end_of_epoch and valid:
            model.wrapped.eval()
            vloss, vacc = _evaluate(model, valid, batch_size)
            model.wrapped.train()
            metrics |= {"valid_loss": vloss, "valid_mean_token_accuracy": vacc,
                        "full_valid_loss": vloss, "full_valid_mean_token_accuracy": vacc}
        reporter.metrics(metrics)
        if end_of_epoch:
            path = _save_checkpoint(spec.workdir, step, params, optimizer,
                                    {"step": step, "tokens": tokens, "metrics": metrics},
                                    keep_only_latest=spec.method == "full")
            reporter.checkpoint(step, {k: float(v) for k, v in metrics.items()}, path)
        if not reporter.keep_going(step, total, tokens):
            raise Stopped()
    model.wrapped.eval()
    result = TrainResult(trained_tokens=tokens, steps=step, metrics=metrics)
    arch = "gemma3" if base.config.model_type.startswith("gemma3") else base.config.model_type
    heads = (base.config.num_attention_heads,
             getattr(base.config, "num_key_value_heads", None) or base.config.num_attention_heads)
    out = spec.workdir / "model"
    out.mkdir(parents=True, exist_ok=True)
    if spec.method == "lora":
        from peft import get_peft_model_state_dict

        from bastion.finetune.export import write_lora_gguf

        state = get_peft_model_state_dict(model.wrapped)
        result.adapter = write_lora_gguf({k: v.detach().float().numpy() for k, v in state.items()},
                                         arch=arch, n_layers=base.config.num_hidden_layers,
                                         alpha=float(hp["lora_alpha"]), out=out / "adapter.gguf",
                                         heads=heads)
    else:
        from bastion.finetune.export import write_merged_gguf

        result.adapter = write_merged_gguf(
            spec.base_gguf, {n: p.detach().float().numpy() for n, p in params.items()},
            arch=arch, n_layers=base.config.num_hidden_layers, out=out / "model.gguf",
            heads=heads)
    return result
