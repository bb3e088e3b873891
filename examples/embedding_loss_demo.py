# Runnable CPU example of olakernels.embedding_distill_loss alone (the main job: `olavlm train`).
"""Compute OLA-VLM's embedding distillation loss on a depth-like batch and train a tiny head.

    python examples/embedding_loss_demo.py

Runs on the CPU in seconds: the three implementations (the seed's eager reference, the chunked
torch path and the fused Triton kernels under the Triton CPU interpreter) agree, and a small
linear predictor trained with the loss moves toward its teacher targets.
"""
import os

import torch

if not torch.cuda.is_available():  # before triton is imported: Triton runs in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from olakernels import EmbeddingDistillLoss, embedding_distill_loss  # noqa: E402


def compare_implementations() -> None:
    g = torch.Generator().manual_seed(0)
    # 6 samples shaped like the depth task (576 tokens x 1024 channels, scaled down 8x8).
    target = torch.randn(6, 72, 128, generator=g)
    pred = (target + 0.8 * torch.randn(6, 72, 128, generator=g)).requires_grad_(True)
    mask = torch.tensor([1.0, 1, 1, 0, 1, 1])  # sample 3 is text-only: no image, no target
    scale = torch.tensor(2.0, requires_grad=True)
    print("impl        loss        smooth_l1   contrastive  |grad_pred|  grad_logit_scale")
    for impl in ("reference", "torch", "triton"):
        pred.grad, scale.grad = None, None
        out = embedding_distill_loss(pred, target, mask, scale, impl=impl)
        out.loss.backward()
        print(f"{impl:<10}  {out.loss.item():.6f}    {out.smooth_l1.item():.6f}    "
              f"{out.contrastive.item():.6f}     {pred.grad.norm().item():.6f}     "
              f"{scale.grad.item():+.6f}")


def train_tiny_head(steps: int = 60) -> None:
    """A linear head learns to predict teacher embeddings from noisy features."""
    g = torch.Generator().manual_seed(1)
    features = torch.randn(16, 64, generator=g)
    teacher = torch.nn.Linear(64, 256).requires_grad_(False)
    targets = teacher(features).detach()
    head = torch.nn.Linear(64, 256)
    loss_fn = EmbeddingDistillLoss(contrastive_weight=0.3)
    opt = torch.optim.AdamW(list(head.parameters()) + list(loss_fn.parameters()), lr=3e-2)
    for step in range(steps + 1):
        out = loss_fn(head(features), targets)
        if step % 20 == 0:
            print(f"step {step:3d}: loss {out.loss.item():.4f} (smooth_l1 "
                  f"{out.smooth_l1.item():.4f}, contrastive {out.contrastive.item():.4f}), "
                  f"logit_scale {loss_fn.logit_scale.item():.3f}")
        opt.zero_grad()
        out.loss.backward()
        opt.step()


if __name__ == "__main__":
    compare_implementations()
    print()
    train_tiny_head()
