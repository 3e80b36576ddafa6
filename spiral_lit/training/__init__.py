"""The training layer: the two LightningModules (SPIRAL/GRPO and the warm start), the step's data
(experience, credit, update), batching, the shared-prefix forward and the data module.
"""
