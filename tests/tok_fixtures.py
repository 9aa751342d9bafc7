"""A small byte-level BPE ``tokenizer.json`` with DeepSeek's special tokens, trained on the spot (no hub)."""

from dsjax.data import tokenizer as tokenizer_lib
from dsjax.infer.chat import DEEPSEEK_ASSISTANT, DEEPSEEK_USER

DEEPSEEK_SPECIALS = [
    tokenizer_lib.DEEPSEEK_BOS,
    tokenizer_lib.DEEPSEEK_EOS,
    tokenizer_lib.DEEPSEEK_FIM_BEGIN,
    tokenizer_lib.DEEPSEEK_FIM_HOLE,
    tokenizer_lib.DEEPSEEK_FIM_END,
]
CHAT_SPECIALS = [*DEEPSEEK_SPECIALS, DEEPSEEK_USER, DEEPSEEK_ASSISTANT]


def write_tokenizer(path, docs, specials=DEEPSEEK_SPECIALS, vocab_size: int = 400) -> str:
    """Train a byte-level BPE on ``docs`` with ``specials`` as added special tokens; save to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(docs, trainer=trainer)
    tok.save(str(path))
    return str(path)
