from typer.testing import CliRunner

from cxrkit.cli.main import app
from cxrkit.models.backbones import BACKBONES


def test_models_lists_every_registered_backbone():
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in BACKBONES.list():
        assert name in result.stdout


def test_models_layers_numbers_layers_from_the_top():
    result = CliRunner().invoke(app, ["models", "--layers", "mobilenet_v2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "features.18.2 " in line]
    assert lines and "│ 1 " in lines[0]  # the last layer (out_relu) is top:1
    assert "139 layers, 19 blocks" in result.stdout


def test_a_pattern_that_matches_nothing_or_comes_with_layers_is_an_error():
    result = CliRunner().invoke(app, ["models", "zzz*"])
    assert result.exit_code != 0 and "no backbone matches 'zzz*'" in str(result.exception)
    result = CliRunner().invoke(app, ["models", "vgg*", "--layers", "alexnet"])
    assert result.exit_code != 0 and "or --layers, not both" in str(result.exception)
