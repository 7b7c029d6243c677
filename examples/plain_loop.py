"""Distil a student from a longkd cache in a plain PyTorch loop.

    python examples/plain_loop.py --cache cache --student student --steps 20

The cache comes from `longkd cache build`, the student is any Hugging Face causal LM directory
with the teacher's tokenizer (README.md, "A first run with your own models", makes both).
With the same seed, batch size and student, the first step's loss is the one `longkd train`
logs for its first step (tests/examples/test_examples.py checks it).
"""

import argparse

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from longkd import CacheDataset, SparseKLLoss, check_model_fits, collate_windows


def main(cache, student, steps=20, batch_size=4, lr=3e-3, seed=0, prefix=None, num_workers=0):
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).train()
    check_model_fits(cache, model, AutoTokenizer.from_pretrained(student))  # vocabulary, tokenizer
    dataset = CacheDataset(cache, batch_size=batch_size, seed=seed, prefix=prefix)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_windows, num_workers=num_workers)
    loss_fn = SparseKLLoss(mode=dataset.loss_mode, temperature=dataset.temperature)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _, batch in zip(range(steps), loader):  # the dataset is endless: take `steps` batches
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        loss = loss_fn(logits, batch["teacher_ids"], batch["teacher_logprobs"], batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dataset.mark_consumed(batch)  # dataset.state_dict() now resumes after this batch
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--student", required=True, help="Hugging Face model directory")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    for step, value in enumerate(main(args.cache, args.student, args.steps, args.batch_size, args.lr), 1):
        print(f"step {step}: loss {value:.4f}")
