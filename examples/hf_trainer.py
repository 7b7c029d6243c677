"""Distil a student from a longkd cache with the Hugging Face `Trainer` and a `compute_loss` override.

    python examples/hf_trainer.py --cache cache --student student --out runs/hf --steps 16
    python examples/hf_trainer.py ... --resume runs/hf/checkpoint-8      # continue from a checkpoint

The dataset is endless, so the run is measured in `max_steps`. The position in the cache is
saved next to every Trainer checkpoint (`longkd_dataset.json`) and restored on resume, so a
resumed run trains on exactly the windows an uninterrupted one would have; Trainer's own
data skipping is switched off (`ignore_data_skip`), as it would replay the skipped batches.

One process here. Under `accelerate launch` / `torchrun` accelerate splits an
IterableDataset's batches across processes itself (so the dataset is built with `rank=0,
world=1`), and each process's dataset then sees only its own batches: the position saved
here, the first process's, would lag by up to N-1 batches. For exact resume on N processes
use a plain loop, where `CacheDataset` shards by rank itself (examples/plain_loop.py).
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from longkd import CacheDataset, SparseKLLoss, check_model_fits, collate_windows

STATE_FILE = "longkd_dataset.json"


class DistillTrainer(Trainer):
    """The student's loss is the sparse KL to the cached teacher (plus CE, if weighted)."""

    def __init__(self, *args, kd_loss, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_loss = kd_loss
        self.seen = []  # window ids of every training batch, for the example's checks

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])
        loss = self.kd_loss(
            outputs.logits, inputs["teacher_ids"], inputs["teacher_logprobs"], inputs["labels"]
        )
        if model.training:
            self.train_dataset.mark_consumed(inputs)
            self.seen.append(inputs["window_ids"].tolist())
        return (loss, outputs) if return_outputs else loss


class SaveDatasetState(TrainerCallback):
    """Writes the dataset's position into every checkpoint folder."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / STATE_FILE).write_text(json.dumps(self.dataset.state_dict()))


def main(cache, student, out, steps=16, batch_size=4, lr=3e-3, seed=0, save_steps=8, resume=None):
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    check_model_fits(cache, model, AutoTokenizer.from_pretrained(student))
    dataset = CacheDataset(cache, batch_size=batch_size, seed=seed, rank=0, world=1)
    if resume:
        dataset.load_state_dict(json.loads((Path(resume) / STATE_FILE).read_text()))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_steps=save_steps,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,  # keep the teacher's columns in the batch
        ignore_data_skip=True,  # the dataset resumes itself (see above)
        report_to=[],
        disable_tqdm=True,
    )
    trainer = DistillTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collate_windows,
        callbacks=[SaveDatasetState(dataset)],
        kd_loss=SparseKLLoss(mode=dataset.loss_mode, temperature=dataset.temperature),
    )
    trainer.train(resume_from_checkpoint=resume)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"losses": losses, "windows": trainer.seen}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--student", required=True, help="Hugging Face model directory")
    parser.add_argument("--out", required=True, help="Trainer output_dir")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resume", help="a checkpoint-N folder of an earlier run")
    args = parser.parse_args()
    result = main(args.cache, args.student, args.out, args.steps, args.batch_size, resume=args.resume)
    print("losses:", " ".join(f"{v:.4f}" for v in result["losses"]))
