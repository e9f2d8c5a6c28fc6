"""Private: the LoRA-FAIR solver, one module per problem.

Which module owns each step: the map in ``docs/lora_fair.md``, "Design: where each step lives".
"""

from lorafair._fair._api import (
    FairSolved,
    ResidualSolution,
    lora_fair,
    lora_fair_solved,
    solve_residual,
)

__all__ = ["FairSolved", "ResidualSolution", "lora_fair", "lora_fair_solved", "solve_residual"]
