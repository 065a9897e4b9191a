"""Conversation templates: how a chat becomes the prompt a checkpoint was trained on.

`render` gives the inference prompt; `segments` gives the same text split into pieces flagged
trained or masked, for LLaVA-style label masking (only the assistant's answers, with their closing
separator, are trained; everything up to and including "ASSISTANT:" of each round is masked).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IMAGE_PLACEHOLDER", "Template", "TEMPLATES", "get_template", "render", "segments"]

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Template:
    """A two-role chat format: system, then rounds of `user_prefix + text + user_suffix` and
    `assistant_prefix + text + assistant_suffix`."""

    name: str
    system: str
    system_format: str  # how the system prompt opens the conversation ("{system}" placeholder)
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str  # closes a trained answer (e.g. "</s>")
    image_format: str = IMAGE_PLACEHOLDER + "\n"  # how an image the question does not place goes before it


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")

TEMPLATES: dict[str, Template] = {
    # LLaVA-1.5 / p-MoD: "{system} USER: {q} ASSISTANT: {a}</s>USER: ..." (separators " " and "</s>")
    "vicuna_v1": Template("vicuna_v1", _VICUNA_SYSTEM, "{system} ", "USER: ", " ", "ASSISTANT:", "</s>"),
    # projector pre-training: the image, then the caption
    "plain": Template("plain", "", "", "", "", "", "\n"),
    # the same turn markers without a system prompt: short prompts for small models
    "chat_nosys": Template("chat_nosys", "", "", "USER: ", " ", "ASSISTANT:", "</s>"),
    "llama3": Template(
        "llama3", "You are a helpful language and vision assistant.",
        "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
    ),
    "chatml": Template(
        "chatml", "You are a helpful assistant.", "<|im_start|>system\n{system}<|im_end|>\n",
        "<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>\n",
    ),
}
# LLaVA's `llava_v1`: the vicuna_v1 format with the "human" wording of the system prompt
TEMPLATES["llava_v1"] = Template(
    "llava_v1", _VICUNA_SYSTEM.replace("curious user", "curious human").replace("user's", "human's"), "{system} ",
    "USER: ", " ", "ASSISTANT:", "</s>",
)
TEMPLATES["qwen"] = TEMPLATES["chatml"]
# Qwen2-VL / Qwen2.5-VL: chatml, each image wrapped in vision markers, straight before the question
TEMPLATES["qwen2_vl"] = Template(
    "qwen2_vl", "You are a helpful assistant.", "<|im_start|>system\n{system}<|im_end|>\n",
    "<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>\n",
    image_format="<|vision_start|>" + IMAGE_PLACEHOLDER + "<|vision_end|>",
)
# Qwen3-VL: the same turns, no default system prompt
TEMPLATES["qwen3_vl"] = Template(
    "qwen3_vl", "", "<|im_start|>system\n{system}<|im_end|>\n", "<|im_start|>user\n", "<|im_end|>\n",
    "<|im_start|>assistant\n", "<|im_end|>\n", image_format="<|vision_start|>" + IMAGE_PLACEHOLDER + "<|vision_end|>",
)


def get_template(name: str | Template) -> Template:
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def _answer_prefix(t: Template) -> str:
    # vicuna puts a space between "ASSISTANT:" and the answer; chat formats end their prefix with a newline
    return " " if t.assistant_prefix.endswith(":") else ""


def segments(template: str | Template, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The conversation as (text, trained) pieces; concatenated they are the full text. A trailing user
    turn ends with the assistant prefix, open for the model's answer."""
    t = get_template(template)
    msgs = list(messages)
    system = t.system
    if msgs and msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"]
    out: list[tuple[str, bool]] = []
    head = t.system_format.format(system=system) if system and t.system_format else ""
    for i, m in enumerate(msgs):
        role, text = m["role"], m["content"]
        if role == "user":
            if t.name == "plain":  # pre-training: the user turn is the image alone
                text = IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in text else text
            out.append((head + t.user_prefix + text + t.user_suffix + t.assistant_prefix, False))
            head = ""
        elif role == "assistant":
            if not out:
                raise ValueError("a conversation must start with a user (or system) message")
            out.append((_answer_prefix(t) + text + t.assistant_suffix, True))
        else:
            raise ValueError(f"message {i}: unknown role {role!r}; expected user, assistant or system")
    return out


def render(template: str | Template, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt for generation: the conversation so far, ending with the assistant's prefix."""
    text = "".join(s for s, _ in segments(template, messages))
    if messages and messages[-1]["role"] == "assistant" and add_generation_prompt:
        raise ValueError("the conversation ends with an assistant message; add the next user message first")
    return text
