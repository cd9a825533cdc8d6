"""align: the InstructGPT recipe (pretrain -> SFT -> rankings + reward model -> PPO) on Hugging Face."""

__version__ = "0.1.0"
