"""The instruction prompt template, defined once: data prep, fine-tuning, inference and the server import it."""

TEMPLATE_VERSION = 1


def format_prompt(instruction, context=""):
    """The prompt up to and including '### Response:\\n' (the model writes the response after it); the
    '### Input:' block is left out when context is empty."""
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{instruction}\n\n")
    if context:
        text += f"### Input:\n{context}\n\n"
    return text + "### Response:\n"

