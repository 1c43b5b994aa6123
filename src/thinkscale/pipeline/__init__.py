"""The pipeline: the built-in task trained with relax (SFT, then GRPO with the SPRM head) and scaled at
test time with reflect. `stages` runs stages with skip/resume, `evaluation` spreads evaluation over
workers, `demo` wires the stages of `thinkscale demo`, `report` writes the combined report."""
