"""Tiny frozen text encoders for the tests, built here and saved with ``save_pretrained``.

Nothing is downloaded: the tokenizer is a byte-level BPE trained by the ``tokenizers`` library on
a few sentences, wrapped as a ``PreTrainedTokenizerFast`` (AutoTokenizer loads it from the folder).
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "a handwritten zero", "a handwritten one", "a handwritten two", "the digit 3, written by hand",
    "a photo of a cat", "a red square on a blue background", "four five six seven eight nine",
]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def tiny_tokenizer(max_length: int = 16):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)  # fmt: skip


def save_tiny_encoder(folder: Path, kind: str = "clip", *, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny ``clip`` (CLIPTextModel), ``clip-projection`` (CLIPTextModelWithProjection),
    ``t5`` (T5EncoderModel) or ``bert`` (BertModel) with its tokenizer, in ``folder``."""
    import torch
    import transformers

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
           "eos_token_id": tok.eos_token_id}  # fmt: skip
    if kind in ("clip", "clip-projection"):
        config = transformers.CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden,
                                             intermediate_size=2 * hidden, num_hidden_layers=2,
                                             num_attention_heads=2, max_position_embeddings=64,
                                             projection_dim=hidden // 2, **ids)  # fmt: skip
        cls = transformers.CLIPTextModel if kind == "clip" else transformers.CLIPTextModelWithProjection
        model = cls(config)
    elif kind == "bert":  # any other encoder: loaded through AutoModel
        config = transformers.BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=2 * hidden,
                                         max_position_embeddings=64, pad_token_id=tok.pad_token_id)  # fmt: skip
        model = transformers.BertModel(config)
    elif kind == "t5":
        config = transformers.T5Config(vocab_size=len(tok), d_model=hidden, d_kv=hidden // 2,
                                       d_ff=2 * hidden, num_layers=2, num_heads=2,
                                       decoder_start_token_id=tok.pad_token_id, **ids)  # fmt: skip
        model = transformers.T5EncoderModel(config)
    else:
        raise ValueError(kind)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder
