"""The ChatML chat template: the paper's prompt format (Tables 4-6), used for tokenizers without one.

Its own module, below both `sft.data` (which renders conversations with it) and `sft.models` (whose
offline byte tokenizer carries it), so neither imports the other.
"""

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
