"""VisualRWKV-7's inference-time prompt padding (`VisualRWKVProcessor(prompt_pad_multiple=16)`): how much the
original's left pad of "\\n\\n" tokens changes the next-token logits.

Run: .venv/bin/python benchmarks/measure_prompt_pad.py

Each RWKV-7 language model (the tests' tiny shape 2 x 32 and VisualRWKV-7 0.1B's 12 x 768; random weights with
BlinkDL's x070 initialisation, then random data-dependent LoRAs so the decays and learning rates vary with the input)
reads each prompt as the VisualRWKV-7 processor makes it, without and with the pad to a multiple of 16: a question as
text only, and after one image, whose 1024 positions hold random unit-variance vectors (what the projector's
LayerNorm outputs). Printed per prompt: the pad length, max |logit change| / max |logit| at the last position, and
whether the top token stays the same.
"""

from __future__ import annotations

import torch

from visualrwkv_hf import Rwkv7Config, Rwkv7ForCausalLM, RwkvWorldTokenizer, VisualRWKVProcessor

SHAPES = {"tiny (2 x 32)": (2, 32, 8), "0.1B shape (12 x 768)": (12, 768, 64)}
QUESTIONS = ("What color is the bus?", "Describe the picture in one short sentence, please.")
IMAGE_TOKEN_ID = 65535


def build_model(layers: int, width: int, head_size: int) -> Rwkv7ForCausalLM:
    torch.manual_seed(0)
    config = Rwkv7Config(hidden_size=width, num_hidden_layers=layers, head_size=head_size)
    model = Rwkv7ForCausalLM(config).eval()
    with torch.no_grad():
        for block in model.model.blocks:
            for parameter in (block.attention.w1, block.attention.a1, block.attention.g1):
                parameter.normal_(0, 0.3)
    return model


@torch.no_grad()
def last_logits(model: Rwkv7ForCausalLM, ids: list[int], image_features: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([ids])
    embeds = model.get_input_embeddings()(ids)
    embeds[ids == IMAGE_TOKEN_ID] = image_features[: int((ids == IMAGE_TOKEN_ID).sum())]
    return model(inputs_embeds=embeds, logits_to_keep=1).logits[0, -1]


def main() -> None:
    processors = {
        multiple: VisualRWKVProcessor(
            tokenizer=RwkvWorldTokenizer(), image_position="first", num_image_tokens=1024,
            image_token_id=IMAGE_TOKEN_ID, prompt_pad_multiple=multiple,
        )
        for multiple in (0, 16)
    }
    print(f"{'model':<24} {'prompt':<10} {'question':<54} {'pad':>4} {'max rel. change':>16} {'same top':>9}")
    for name, shape in SHAPES.items():
        model = build_model(*shape)
        image_features = torch.randn(1024, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        for with_image in (False, True):
            for question in QUESTIONS:
                prompts = {}
                for multiple, processor in processors.items():
                    chat = [{"role": "user", "content": [{"type": "image"}] * with_image
                             + [{"type": "text", "text": question}]}]
                    text = processor.apply_chat_template(chat, add_generation_prompt=True)
                    prompts[multiple] = processor._tokenize_prompt(text, with_image)
                plain, padded = (last_logits(model, prompts[m], image_features) for m in (0, 16))
                change = float((padded - plain).abs().max() / plain.abs().max())
                print(f"{name:<24} {'image' if with_image else 'text':<10} {question:<54} "
                      f"{len(prompts[16]) - len(prompts[0]):>4} {change:>16.2e} "
                      f"{'yes' if plain.argmax() == padded.argmax() else 'no':>9}")


if __name__ == "__main__":
    main()
