"""
Take a model out: a Hugging Face GPT-2 folder that transformers loads as it is.

    python export.py --init_from=out/toy_dpo --out_dir=out/toy_dpo/hf
    python -c "from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; \\
               d = 'out/toy_dpo/hf'; model, tok = M.from_pretrained(d), T.from_pretrained(d)"

--init_from: a run folder or its ckpt.pt, a Hugging Face folder, gpt2[-medium|-large|-xl] or a
hub repo user/name (whatever GPT.from_pretrained reads). --out_dir gets config.json,
model.safetensors and GPT-2's tokenizer files (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json), written from tiktoken's own data. `dpo.py --export_hf=true` writes the
same folder at the end of a run (out_dir/hf): both call GPT.save_pretrained. The files are
written under temporary names and renamed once all are complete: a failure leaves none.
"""
import os
import signal
import sys
from dataclasses import dataclass

import configurator
from model import GPT
from prepare import PrepareError


@dataclass
class ExportConfig:
    """a model (a run, a checkpoint, a Hugging Face folder or hub name) -> a Hugging Face folder"""
    init_from: str = ""  # a run folder or ckpt.pt, a Hugging Face folder, gpt2[-xl], user/repo
    out_dir: str = ""  # the folder to write (made if missing; the files it had are replaced)


def export(cfg) -> list:
    """-> the names of the files written"""
    if not cfg.init_from or not cfg.out_dir:
        raise ValueError("--init_from and --out_dir are required, e.g. "
                         "python export.py --init_from=out/toy_dpo --out_dir=out/toy_dpo/hf")
    if cfg.init_from in ("scratch", "resume"):
        raise ValueError(f"--init_from={cfg.init_from}: export takes a trained model, "
                         f"e.g. its run folder --init_from=out/toy_dpo")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"--out_dir={cfg.out_dir} is a file: expected a folder (made if missing)")
    # a config.json beside a run's ckpt.pt would make the folder load as the export, not the run
    if os.path.isfile(os.path.join(cfg.out_dir, "ckpt.pt")):
        raise ValueError(f"--out_dir={cfg.out_dir} holds a run (ckpt.pt): export into a folder "
                         f"of its own, e.g. --out_dir={os.path.join(cfg.out_dir, 'hf')}")
    model = GPT.from_pretrained(cfg.init_from)
    if model.config.reward_head:  # GPT2LMHeadModel has no place for the scalar head
        raise ValueError(f"--init_from={cfg.init_from} is a reward model (--loss_type=reward): export "
                         f"writes a language model; use it as a judge, --judge=rm:{cfg.init_from}")
    files = model.save_pretrained(cfg.out_dir)
    millions = model.num_params(non_embedding=False) / 1e6
    print(f"wrote {cfg.out_dir}: {', '.join(files)} ({millions:.1f}M parameters)")
    if "vocab.json" not in files:
        print(f"note: no tokenizer files: vocab_size={model.config.vocab_size} is smaller than "
              f"GPT-2's, so its tokenizer does not fit this model")
    return files


def main(argv):
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up as Ctrl-C does
    try:
        export(configurator.parse(argv, ExportConfig))
    except (ValueError, OSError, PrepareError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        message = "export.py: interrupted before the export finished; run the same command again"
        print(message, file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
