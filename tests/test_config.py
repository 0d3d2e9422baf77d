"""Gin configuration: composition, overrides, search paths and error messages."""
import gin
import pytest

from glam import config
from glam.cli import split_gin_overrides
from glam.models.lm import DecoderLM


def query(name):
  return gin.query_parameter(name)


def test_files_compose_and_bindings_override(tmp_path):
  (tmp_path / "a.gin").write_text("DecoderLM.d_model = 64\nDecoderLM.num_blocks = 2\n")
  (tmp_path / "b.gin").write_text("DecoderLM.num_blocks = 3\n")
  config.parse([str(tmp_path / "a.gin"), str(tmp_path / "b.gin")], ["DecoderLM.d_model = 96"])
  assert query("DecoderLM.num_blocks") == 3 and query("DecoderLM.d_model") == 96


def test_search_path_and_repo_configs(tmp_path):
  (tmp_path / "mine.gin").write_text("include 'configs/models/dense_tiny.gin'\nDecoderLM.num_blocks = 7\n")
  config.parse(["mine.gin"], [], search_paths=[str(tmp_path)])
  assert query("DecoderLM.num_blocks") == 7 and query("DecoderLM.d_model") == 128


def test_missing_file_is_named():
  with pytest.raises(config.ConfigError, match=r"--gin_file=nope.gin: not found in the search path"):
    config.parse(["nope.gin"])


def test_unknown_binding_names_file_and_line(tmp_path):
  path = tmp_path / "bad.gin"
  path.write_text("DecoderLM.d_model = 64\nDecoderLM.width = 3\n")
  with pytest.raises(config.ConfigError, match=r"(?s)parameter named 'width'.*bad.gin\", line 2"):
    config.parse([str(path)])


def test_syntax_error_names_file_and_line(tmp_path):
  path = tmp_path / "broken.gin"
  path.write_text("DecoderLM.d_model = 64\n\nDecoderLM.block = (\"attn\",\n")
  with pytest.raises(config.ConfigError, match=r"broken.gin\", line 4: EOF in multi-line statement"):
    config.parse([str(path)])


def test_unknown_configurable_in_override():
  with pytest.raises(config.ConfigError, match=r"No configurable matching 'Decoder'"):
    config.parse([], ["Decoder.d_model = 3"])


def test_invalid_value_fails_at_construction_naming_binding():
  config.parse(["configs/models/dense_tiny.gin"], ["FeedForward.activation = 'tanh'"])
  from flax import nnx
  with pytest.raises(ValueError, match=r"FeedForward.activation='tanh'"):
    DecoderLM(rngs=nnx.Rngs(0))


def test_cli_splits_gin_overrides():
  rest, bindings = split_gin_overrides(["train", "--gin.train.num_steps=5", "--model_dir=x"])
  assert rest == ["train", "--model_dir=x"] and bindings == ["train.num_steps=5"]


def test_bare_paths_in_overrides_are_strings():
  # T5X users write --gin.X=/path; gin itself would reject it. Quoted values, references and numbers
  # keep their gin meaning.
  config.parse(["configs/runs/finetune.gin"], ["init_checkpoint=/tmp/run-1/checkpoints",
                                               "train.distill_from = runs/a.b", "train.data = 'synthetic:copy'"])
  assert query("%init_checkpoint") == "/tmp/run-1/checkpoints"
  assert query("train.distill_from") == "runs/a.b" and query("train.data") == "synthetic:copy"
  assert config.quote_bare_path("MoeLayer.router = @TokenChoiceRouter") == "MoeLayer.router = @TokenChoiceRouter"
  assert config.quote_bare_path("DecoderLM.d_model = 64") == "DecoderLM.d_model = 64"
  with pytest.raises(config.ConfigError, match="gin configuration error"):
    config.parse([], ["DecoderLM.d_model = not a path"])
