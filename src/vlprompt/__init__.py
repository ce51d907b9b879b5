"""vlprompt: parameter-efficient multi-modal prompt tuning of vision-language models."""
__version__ = "0.1.0"
