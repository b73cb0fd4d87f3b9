"""BasicTrainer: one process, one loop, any loss.

A trainer runs one stage of a run (`sft` or `align`). The loss comes from the config
(`trainers/losses.py`); trainers differ only by how they run, so a subclass overrides how the
model is wrapped, how batches are split, how metrics are reduced and how checkpoints are written.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from tqdm import tqdm

from preference_datasets import TokenizedPair, collate, epoch_order
from trainers.losses import REWARDS, loss_setting, preference_loss, sft_loss
from utils import atomic_torch_save, response_logps, rng_state, set_rng_state, state_fingerprint, text_fingerprint

OPTIMIZERS = {"rmsprop": torch.optim.RMSprop, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
TIMING_KEYS = ("tokens_per_s", "seconds")


class MetricsLog:
    """`metrics.jsonl` of the run (one JSON object per line), mirrored to wandb when enabled."""

    def __init__(self, path: Path, wandb_run=None):
        self.path = path
        self.wandb_run = wandb_run

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, offset: int) -> None:
        """Drop what was logged after `offset`: a resumed run logs those steps again."""
        if self.path.exists():
            with open(self.path, "r+b") as handle:
                handle.truncate(offset)

    def log(self, record: Mapping) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"{record['stage']}/{k}": v for k, v in record.items() if k != "stage"})


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load a `save_pretrained` folder's safetensors into an existing model, in place."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    state = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{folder}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()


class BasicTrainer:
    """Runs one stage: evaluation at the start, the training loop, checkpoints, the final model.

    Args:
        cfg: the composed run config.
        stage: `sft` (NLL of the chosen responses) or `align` (the loss of `cfg.loss`).
        policy: the model to train, in place. For `align` its weights at construction are the
            frozen reference.
        tokenizer: saved beside every checkpoint.
        data: tokenized `train` and `test` pairs.
        stage_dir: where `checkpoint/` and `final/` of this stage go.
        metrics: the run's metrics log.
        embeddings: per split, the [n, d] embeddings of each pair's chosen and rejected side
            (RPO's weights), computed once before training.
    """

    def __init__(
        self,
        cfg: DictConfig,
        stage: str,
        policy: torch.nn.Module,
        tokenizer,
        data: Mapping[str, Sequence[TokenizedPair]],
        stage_dir: Path,
        metrics: MetricsLog,
        embeddings: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self.cfg, self.stage, self.policy, self.tokenizer = cfg, stage, policy, tokenizer
        self.stage_cfg = cfg[stage]
        self.loss_cfg = OmegaConf.to_container(cfg.loss) if stage == "align" else {"name": "sft"}
        self.train_set = data["train"]
        self.test_set = data["test"][: cfg.train.max_eval_examples or None]
        self.stage_dir, self.metrics, self.embeddings = stage_dir, metrics, embeddings
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.device = next(policy.parameters()).device
        self.reference_model, self.reference_logps = None, None
        if stage == "align" and loss_setting(self.loss_cfg, "reward", REWARDS) != "length_normalized":
            if cfg.reference.precompute:
                self.reference_logps = self.precomputed_reference_logps()
            else:
                self.reference_model = copy.deepcopy(policy).eval().requires_grad_(False)
        self.optimizer = OPTIMIZERS[cfg.train.optimizer](policy.parameters(), lr=self.stage_cfg.lr)
        warmup = self.stage_cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        self.step = self.examples = self.epoch = self.position = 0
        budget = self.stage_cfg.epochs * len(self.train_set)
        self.total_examples = min(budget, self.stage_cfg.max_examples or budget)

    # ----------------------------------------------------------------------------- log-probs

    def logps(self, model: torch.nn.Module, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs and token counts of every sequence of the batch, one forward."""
        return response_logps(
            model,
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
            batch["labels"].to(self.device),
        )

    def batches(self, examples: Sequence[TokenizedPair], size: int, with_rejected: bool = True):
        for start in range(0, len(examples), size):
            indices = range(start, min(start + size, len(examples)))
            yield collate([examples[i] for i in indices], indices, self.pad_id, with_rejected)

    @torch.no_grad()
    def all_logps(self, model: torch.nn.Module, examples: Sequence[TokenizedPair], desc: str) -> torch.Tensor:
        """[len(examples), 2] summed log-probs of (chosen, rejected), in eval mode."""
        was_training = model.training
        model.eval()
        size = self.cfg.train.eval_batch_size
        rows = []
        for batch in tqdm(self.batches(examples, size), total=math.ceil(len(examples) / size), desc=desc, leave=False):
            logps, _ = self.logps(model, batch)
            rows.append(logps.view(2, -1).T.float().cpu())
        model.train(was_training)
        return torch.cat(rows)

    def precomputed_reference_logps(self) -> dict[str, torch.Tensor]:
        """Reference log-probs of both splits, cached on disk by (weights, data, tokenization)."""
        data_key = text_fingerprint([[e.prompt, e.chosen, e.rejected] for e in self.train_set + self.test_set])
        key = text_fingerprint(state_fingerprint(self.policy), data_key, self.cfg.max_length, self.cfg.max_prompt_length)
        path = Path(self.cfg.cache_dir) / "reference_logps" / f"{key}.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        logps = {
            "train": self.all_logps(self.policy, self.train_set, "reference log-probs (train)"),
            "test": self.all_logps(self.policy, self.test_set, "reference log-probs (test)"),
        }
        atomic_torch_save(logps, path)
        return logps

    def reference_batch_logps(self, batch: Mapping, split: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The reference log-probs of the batch's chosen and rejected responses (None when reference-free)."""
        if self.reference_logps is not None:
            rows = self.reference_logps[split][batch["index"]].to(self.device)
            return rows[:, 0], rows[:, 1]
        if self.reference_model is None:
            return None, None
        with torch.no_grad():
            logps, _ = self.logps(self.reference_model, batch)
        return logps.view(2, -1)[0], logps.view(2, -1)[1]

    def batch_embeddings(self, batch: Mapping, split: str) -> dict[str, torch.Tensor]:
        if self.embeddings is None:
            return {}
        chosen, rejected = self.embeddings[split]
        return {"chosen_embeddings": chosen[batch["index"]], "rejected_embeddings": rejected[batch["index"]]}

    # ----------------------------------------------------------------------------- losses

    def batch_loss(self, batch: Mapping, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's loss and per-example statistics (each a tensor over the batch's examples)."""
        logps, counts = self.logps(self.policy, batch)
        if self.stage == "sft":
            return sft_loss(logps, counts), {"logps/chosen": logps.detach()}
        return self.pair_loss(logps, counts, batch, split)

    def pair_loss(
        self, logps: torch.Tensor, counts: torch.Tensor, batch: Mapping, split: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The configured preference loss from the policy log-probs of [chosen; rejected]."""
        chosen, rejected = logps.view(2, -1)
        chosen_lengths, rejected_lengths = counts.view(2, -1)
        reference_chosen, reference_rejected = self.reference_batch_logps(batch, split)
        loss, chosen_rewards, rejected_rewards = preference_loss(
            chosen,
            rejected,
            reference_chosen,
            reference_rejected,
            self.loss_cfg,
            chosen_lengths,
            rejected_lengths,
            **self.batch_embeddings(batch, split),
        )
        return loss, {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float(),
            "rewards/margin": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen.detach(),
            "logps/rejected": rejected.detach(),
        }

    def example_weight(self, examples: Sequence[TokenizedPair]) -> int:
        """How much of a batch's mean loss a micro-batch carries: tokens for SFT, pairs otherwise."""
        return sum(len(e.chosen) for e in examples) if self.stage == "sft" else len(examples)

    # ----------------------------------------------------------------------------- training

    def next_indices(self, count: int) -> list[int]:
        """The next `count` training examples; epochs follow each other in (seed, epoch) order."""
        indices = []
        while len(indices) < count:
            order = epoch_order(len(self.train_set), self.cfg.seed, self.epoch)
            take = order[self.position : self.position + count - len(indices)]
            indices += take
            self.position += len(take)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    def train_step(self, indices: Sequence[int]) -> dict[str, float]:
        """One optimizer step on a batch, split into `gradient_accumulation_steps` micro-batches.

        Each micro-batch loss is weighted by its share of the batch, so the update equals that of
        the whole batch in one pass for losses that do not couple examples.
        """
        self.policy.train()
        with_rejected = self.stage != "sft"
        examples = [self.train_set[i] for i in indices]
        total_weight = self.example_weight(examples)
        sums: dict[str, float] = {"loss": 0.0}
        tokens = 0
        for chunk in torch.tensor_split(torch.tensor(indices), self.cfg.train.gradient_accumulation_steps):
            if len(chunk) == 0:
                continue
            chunk_examples = [self.train_set[i] for i in chunk.tolist()]
            batch = collate(chunk_examples, chunk.tolist(), self.pad_id, with_rejected)
            tokens += int(batch["attention_mask"].sum())
            loss, stats = self.batch_loss(batch, "train")
            share = self.example_weight(chunk_examples) / total_weight
            (loss * share).backward()
            sums["loss"] += loss.item() * share
            for key, values in stats.items():
                sums[key] = sums.get(key, 0.0) + values.sum().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.train.max_grad_norm)
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        record = {k: v if k == "loss" else v / len(indices) for k, v in sums.items()}
        return {**record, "lr": learning_rate, "grad_norm": grad_norm.item(), "tokens": tokens}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss, rewards and the policy's own preference: log pi(chosen) > log pi(rejected)."""
        self.policy.eval()
        totals: dict[str, float] = {}
        weighted_loss = 0.0
        for batch in self.batches(self.test_set, self.cfg.train.eval_batch_size):
            n = len(batch["index"])
            logps, counts = self.logps(self.policy, batch)
            chosen, rejected = logps.view(2, -1)
            stats = {"logp_accuracy": (chosen > rejected).float(), "logps/chosen": chosen, "logps/rejected": rejected}
            if self.stage == "sft":
                loss = sft_loss(chosen, counts.view(2, -1)[0])
                weight = counts.view(2, -1)[0].sum().item()
            else:
                loss, pair_stats = self.pair_loss(logps, counts, batch, "test")
                stats.update(pair_stats)
                weight = n
            weighted_loss += loss.item() * weight
            totals["weight"] = totals.get("weight", 0.0) + weight
            for key, values in stats.items():
                totals[key] = totals.get(key, 0.0) + values.sum().item()
        self.policy.train()
        weight = totals.pop("weight")
        return {"loss": weighted_loss / weight, **{k: v / len(self.test_set) for k, v in totals.items()}}

    def log(self, kind: str, values: Mapping) -> None:
        prefix = "eval/" if kind == "eval" else ""
        record = {"stage": self.stage, "step": self.step, "examples": self.examples}
        record.update({(k if k in TIMING_KEYS else prefix + k): v for k, v in values.items()})
        self.metrics.log(record)

    def crossed(self, every: int | None, before: int) -> bool:
        return bool(every) and self.examples // every > before // every

    def train(self, start_offset: int) -> dict:
        """Run the stage to its budget (resuming from `checkpoint/` if there is one).

        `start_offset` is where this stage's lines begin in metrics.jsonl: a stage that starts
        over drops whatever an interrupted attempt logged after it.
        """
        self.recover(self.stage_dir / "checkpoint")
        initial_eval = self.load_checkpoint() if (self.stage_dir / "checkpoint").exists() else None
        if initial_eval is None:
            self.metrics.truncate(start_offset)
            initial_eval = self.evaluate()
            self.log("eval", initial_eval)
        bar = tqdm(total=self.total_examples, initial=self.examples, desc=self.stage, unit="ex")
        while self.examples < self.total_examples:
            started = time.perf_counter()
            indices = self.next_indices(min(self.cfg.train.batch_size, self.total_examples - self.examples))
            before = self.examples
            record = self.train_step(indices)
            self.step += 1
            self.examples += len(indices)
            seconds = time.perf_counter() - started
            record.update(seconds=seconds, tokens_per_s=record.pop("tokens") / seconds)
            bar.update(len(indices))
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if self.step % self.cfg.train.log_every == 0:
                self.log("train", record)
            if self.crossed(self.cfg.train.eval_every, before) and self.examples < self.total_examples:
                self.log("eval", self.evaluate())
            if self.crossed(self.cfg.train.save_every, before) and self.examples < self.total_examples:
                self.save_checkpoint(initial_eval)
        bar.close()
        final_eval = self.evaluate()
        self.log("eval", final_eval)
        return self.save_final(initial_eval, final_eval)

    # ----------------------------------------------------------------------------- checkpoints

    def stage_model(self, folder: Path) -> Path:
        """Write an HF-format folder (weights, config, tokenizer) beside `folder`, to be swapped in."""
        staging = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        self.policy.save_pretrained(staging)
        self.tokenizer.save_pretrained(staging)
        return staging

    def save_checkpoint(self, initial_eval: Mapping) -> None:
        """Weights + trainer state (optimizer, scheduler, position, RNG), swapped in atomically."""
        staging = self.stage_model(self.stage_dir / "checkpoint")
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "counters": [self.step, self.examples, self.epoch, self.position],
            "rng": rng_state(),
            "metrics_offset": self.metrics.offset(),
            "initial_eval": json.dumps(initial_eval),
        }
        atomic_torch_save(state, staging / "trainer_state.pt")
        self.swap_into_place(staging, self.stage_dir / "checkpoint")

    @staticmethod
    def swap_into_place(staging: Path, folder: Path) -> None:
        """Replace `folder` by `staging`; at every instant one complete copy exists on disk."""
        previous = folder.with_name(folder.name + ".old")
        if folder.exists():
            folder.rename(previous)
        staging.rename(folder)
        shutil.rmtree(previous, ignore_errors=True)

    @staticmethod
    def recover(folder: Path) -> None:
        """Undo a swap that a crash interrupted between its two renames."""
        previous = folder.with_name(folder.name + ".old")
        if previous.exists() and not folder.exists():
            previous.rename(folder)

    def load_checkpoint(self) -> dict:
        folder = self.stage_dir / "checkpoint"
        load_weights(self.policy, folder)
        state = torch.load(folder / "trainer_state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.examples, self.epoch, self.position = state["counters"]
        set_rng_state(state["rng"])
        self.metrics.truncate(state["metrics_offset"])
        print(f"Resuming {self.stage} from {folder} at step {self.step} ({self.examples} examples)")
        return json.loads(state["initial_eval"])

    def save_final(self, initial_eval: Mapping, final_eval: Mapping) -> dict:
        result = {
            "initial_eval": dict(initial_eval),
            "final_eval": dict(final_eval),
            "steps": self.step,
            "examples": self.examples,
            "metrics_offset": self.metrics.offset(),
        }
        staging = self.stage_model(self.stage_dir / "final")
        (staging / "result.json").write_text(json.dumps(result, indent=2))
        self.swap_into_place(staging, self.stage_dir / "final")
        shutil.rmtree(self.stage_dir / "checkpoint", ignore_errors=True)
        return result
