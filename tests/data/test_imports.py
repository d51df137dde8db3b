import subprocess
import sys


def test_loaders_import_without_heavy_modules_or_side_effects(tmp_path):
    code = (
        "import sys\n"
        "import cxrkit.data.images, cxrkit.data.dicom, cxrkit.data.folder, cxrkit.data.csv, cxrkit.data.medmnist\n"
        "import cxrkit.data.combine, cxrkit.data.labels, cxrkit.data.sources, cxrkit.data.transforms\n"
        "from PIL import Image, ImageFile\n"
        "heavy = sorted(m for m in ('torch', 'pydicom', 'medmnist', 'sklearn') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert ImageFile.LOAD_TRUNCATED_IMAGES is False and Image.MAX_IMAGE_PIXELS == 89478485\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / ".medmnist").exists()
