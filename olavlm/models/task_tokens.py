# The learnable gen/depth/seg task tokens (SPEC 1.5).
"""Task tokens: ``special_{depth,seg}_tokens`` (num_queries x H) and ``special_gen_tokens``
(num_task_tokens x H), N(0, 1) initialized as in the seed.

What enters the sequence (``expand_emb``, the only mode): per task in ``aux_mode`` order,
num_task_tokens rows -- depth/seg mean-pool their parameter in equal consecutive groups
(576 rows -> 8 means of 72), gen inserts its parameter as is. The depth/seg parameters are also
the queries of their heads, so their gradient arrives through both paths.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["TaskTokens"]


class TaskTokens(nn.Module):
    def __init__(self, tasks: tuple[str, ...], hidden_size: int, num_task_tokens: int,
                 num_queries: dict[str, int]) -> None:
        super().__init__()
        self.tasks = tasks
        self.num_task_tokens = num_task_tokens
        self.hidden_size = hidden_size
        for task in tasks:
            rows = num_task_tokens if task == "gen" else num_queries[task]
            setattr(self, f"special_{task}_tokens", nn.Parameter(torch.randn(rows, hidden_size)))

    def parameter_for(self, task: str) -> torch.Tensor:
        return getattr(self, f"special_{task}_tokens")

    def inserted(self) -> torch.Tensor:
        """(len(tasks) * num_task_tokens, H): the rows spliced after the image, computed once per
        step (the seed recomputes the mean-pool per sample, SPEC 9 item 12)."""
        n = self.num_task_tokens
        rows = []
        for task in self.tasks:
            param = self.parameter_for(task)
            if task != "gen" and param.shape[0] != n:
                param = param.view(n, param.shape[0] // n, param.shape[1]).mean(1)
            rows.append(param)
        if not rows or n == 0:
            return torch.empty(0, self.hidden_size)
        return torch.cat(rows, 0)

    def offset(self, task: str) -> int:
        """Offset of the task's tokens inside the inserted block."""
        return self.tasks.index(task) * self.num_task_tokens
