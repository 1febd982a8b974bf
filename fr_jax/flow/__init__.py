"""FlowReasoner: the meta-agent's prompt and answer parsing (prompt.py), the workflow mode of GRPO and evaluation
(task.py), the per-query refinement loop (optimize.py) and the SFT data it yields (data.py); workflows run in
sandbox_service. See docs/flow.md."""

from fr_jax.flow.prompt import (
    MAX_OPERATOR_CALLS,
    SEED_GRAPH,
    SEED_MODIFICATION,
    SEED_PROMPT,
    Experience,
    ParentDesign,
    ParsedDesign,
    build_design_prompt,
    parse_design,
)

__all__ = [
    "MAX_OPERATOR_CALLS",
    "SEED_GRAPH",
    "SEED_MODIFICATION",
    "SEED_PROMPT",
    "Experience",
    "ParentDesign",
    "ParsedDesign",
    "build_design_prompt",
    "parse_design",
]
