"""Run several trainings of nlp_example.py in one `accelerate launch` (each launch costs
seconds of imports): argv is a JSON file holding a list of argument lists. Accelerate's
process-wide state is reset between runs; the process group stays."""

from __future__ import annotations

import json
import sys

import nlp_example
from accelerate.state import AcceleratorState, GradientState

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    for argv in plan:
        nlp_example.training_function(nlp_example.parse_args(argv))
        AcceleratorState._reset_state()
        GradientState._reset_state()
