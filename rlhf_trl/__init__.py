"""rlhf-trl: SFT, reward model, PPO, chat and export on Hugging Face TRL, one YAML recipe per stage."""

import logging

# bitsandbytes logs a warning about optional CPU kernels on every import on machines without them;
# it says nothing about this run, so only its errors are shown.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__version__ = "0.1.0"
