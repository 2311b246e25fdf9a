"""`load_tokenizer`: the tokenizer of a local model directory.

The files are read generically (tokenizer.json, else a SentencePiece tokenizer.model or a tiktoken file), then
tokenizer_config.json, special_tokens_map.json, generation_config.json and config.json have their say. Where a
repository ships its tokenizer or chat prompt as Python code (never imported or run), the family registry says
which family's tokenizer rules (`mlxfam.models.family.TokenizerRules`) restate that code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MlxfamError
from .core import (
    FileDefaults,
    Tokenizer,
    TokenizerSource,
    Vocabulary,
    added_if,
    added_tokens,
    read_json,
    required_token,
    token_id_of,
    with_added_tokens,
)
from .hf_json import read_tokenizer_json
from .spm_vocab import sentencepiece_processor, sentencepiece_vocabulary
from .tiktoken_vocab import TiktokenDefinition, read_tiktoken, tiktoken_ranks

if TYPE_CHECKING:
    from ..models.family import Family


def load_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer of a model directory, or None when it has no tokenizer files."""
    path = Path(path)
    source = TokenizerSource(path, read_json(path / "tokenizer_config.json"), read_json(path / "config.json"))
    read = _read_with_family_rules(source)
    if read is None:
        return None
    vocabulary, defaults = read
    config, config_file, model_config = source.config, source.config_file, source.model_config

    bos_id, eos_id = defaults.bos_id, defaults.eos_id
    # tokenizer_config.json wins over special_tokens_map.json, which wins over the file's own defaults.
    for settings_file in (path / "special_tokens_map.json", config_file):
        settings = read_json(settings_file)
        if "bos_token" in settings:
            bos_id = token_id_of(vocabulary, settings["bos_token"], f"{settings_file}: bos_token")
        if "eos_token" in settings:
            eos_id = token_id_of(vocabulary, settings["eos_token"], f"{settings_file}: eos_token")
    prefix, suffix = defaults.prefix_ids, defaults.suffix_ids
    if config.get("add_bos_token") is not None:
        prefix = added_if(config["add_bos_token"], bos_id, f"{config_file}: add_bos_token")
    if config.get("add_eos_token") is not None:
        suffix = added_if(config["add_eos_token"], eos_id, f"{config_file}: add_eos_token")

    eos_ids = [
        *([eos_id] if eos_id is not None else []),
        *defaults.stop_ids,
        *_id_list(read_json(path / "generation_config.json").get("eos_token_id"), path / "generation_config.json"),
        *_id_list(model_config.get("eos_token_id"), path / "config.json"),
    ]
    template, chat_format = _chat_template(path, config), defaults.chat_format
    if template is not None and chat_format is not None and not chat_format.uses_template:
        chat_format = None  # the repository's jinja template is its chat prompt
    return Tokenizer(
        vocabulary,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        prefix_ids=prefix,
        suffix_ids=suffix,
        chat_template=template,
        chat_format=chat_format,
    )


def _read_with_family_rules(source: TokenizerSource) -> tuple[Vocabulary, FileDefaults] | None:
    """The vocabulary as the first candidate family whose files are there reads it (its own reader, else the
    generic one), with that family's chat format, stop tokens and per-repository chat settings."""
    from ..models.family import TokenizerRules

    candidates = _candidate_families(source)
    for name, rules in [(f.name, f.tokenizer) for f in candidates] or [("", TokenizerRules())]:
        read = rules.read(source) if rules.read is not None else _read_vocabulary_files(source)
        if read is None:
            continue
        vocabulary, defaults = read
        defaults.chat_format = defaults.chat_format or rules.chat_format
        defaults.stop_ids += [required_token(vocabulary, token, source.path, name) for token in rules.stop_tokens]
        if rules.chat_settings is not None:
            defaults = rules.chat_settings(vocabulary, defaults, source)
        return vocabulary, defaults
    return None


def _candidate_families(source: TokenizerSource) -> list[Family]:
    """The families whose tokenizer rules may apply, in order: those implementing the named tokenizer class (the
    ones of config.json's model_type first), else those a vocabulary file names, then those of the model_type.
    A tokenizer class shipped as code that no family implements is refused (a class named besides the shipped
    one is a transformers class, which transformers itself would use)."""
    from ..models import FAMILIES

    path, model_type = source.path, source.model_config.get("model_type")
    remote_class, remote_source = _remote_tokenizer_class(source)
    named = [(source.config.get("tokenizer_class"), source.config_file)]
    named.append((source.model_config.get("tokenizer_class"), path / "config.json"))
    tokenizer_class, where = next(((name, file) for name, file in named if name), (remote_class, remote_source))
    implementing = [f for f in FAMILIES if tokenizer_class in f.tokenizer.remote_classes]
    if implementing:
        return sorted(implementing, key=lambda family: model_type not in family.model_types)
    if tokenizer_class is not None and tokenizer_class == remote_class:
        implemented = ", ".join(dict.fromkeys(c for f in FAMILIES for c in f.tokenizer.remote_classes))
        raise MlxfamError(
            f"{where}: tokenizer class {tokenizer_class!r} is Python code in the model repository, which mlxfam "
            f"never runs, and mlxfam has no implementation of it (implemented: {implemented})"
        )
    by_file = [f for f in FAMILIES if any((path / name).is_file() for name in f.tokenizer.vocabulary_files)]
    by_type = [f for f in FAMILIES if model_type in f.model_types and f not in by_file]
    return by_file + by_type


def _remote_tokenizer_class(source: TokenizerSource) -> tuple[str | None, Path | None]:
    """The tokenizer class a repository ships as code (auto_map's AutoTokenizer: "module.Class" or a
    [slow, fast] pair of them), and the file naming it."""
    for file, settings in ((source.config_file, source.config), (source.path / "config.json", source.model_config)):
        auto_map = settings.get("auto_map")
        entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
        references = [entry] if isinstance(entry, str) else entry if isinstance(entry, list) else []
        reference = next((r for r in references if isinstance(r, str)), None)
        if reference is not None:
            return reference.rsplit(".", 1)[-1], file
    return None, None


def _read_vocabulary_files(source: TokenizerSource) -> tuple[Vocabulary, FileDefaults] | None:
    """The vocabulary of tokenizer.json, else tokenizer.model or a *.tiktoken file; None without any."""
    path = source.path
    model_files = [path / "tokenizer.model", *sorted(path.glob("*.tiktoken"))]
    if (path / "tokenizer.json").is_file():
        return read_tokenizer_json(path / "tokenizer.json")
    if any(f.is_file() for f in model_files):
        vocabulary, defaults = _read_bpe_model(next(f for f in model_files if f.is_file()))
        return with_added_tokens(vocabulary, added_tokens(source.config, source.config_file)), defaults
    if (path / "merges.txt").is_file():
        raise MlxfamError(f"{path}: vocab.json/merges.txt without a tokenizer.json is not supported")
    return None


def _read_bpe_model(file: Path) -> tuple[Vocabulary, FileDefaults]:
    """A SentencePiece tokenizer.model, or a tiktoken file one of the families defines."""
    data = file.read_bytes()
    ranks = tiktoken_ranks(data)
    if ranks is None and file.name == "tokenizer.model":
        processor = sentencepiece_processor(data, str(file))
        bos_id = processor.bos_id() if processor.bos_id() >= 0 else None
        eos_id = processor.eos_id() if processor.eos_id() >= 0 else None
        # transformers' SentencePiece tokenizer and llama.cpp add BOS unless told otherwise.
        defaults = FileDefaults(bos_id, eos_id, prefix_ids=[bos_id] if bos_id is not None else [])
        return sentencepiece_vocabulary(processor), defaults
    definitions = _tiktoken_definitions()
    if ranks is not None and file.name in definitions:
        return read_tiktoken(ranks, definitions[file.name], file)
    known = ", ".join(f"{d.name}'s {d.file_name}" for d in definitions.values())
    raise MlxfamError(f"{file}: not a known tokenizer file (a SentencePiece model, or a tiktoken file: {known})")


def _tiktoken_definitions() -> dict[str, TiktokenDefinition]:
    """The tiktoken files the families define, by file name."""
    from ..models import FAMILIES

    return {d.file_name: d for family in FAMILIES for d in family.tokenizer.tiktoken}


def _id_list(value, source: Path) -> list[int]:
    """An `eos_token_id` field: absent, one id or a list of ids."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise MlxfamError(f"{source}: eos_token_id must be an int or a list of ints, got {value!r}")
    return values


def _chat_template(path: Path, config: dict) -> str | None:
    """tokenizer_config.json's chat_template, else chat_template.jinja, else chat_template.json."""
    template = config.get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: the plain chat one is "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None:
            raise MlxfamError(f"{path / 'tokenizer_config.json'}: chat_template list has no 'default' template")
    return template
