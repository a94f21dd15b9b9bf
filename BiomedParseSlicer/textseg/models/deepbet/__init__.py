"""deepbet: T1 MRI brain extraction (Fisch et al. 2024, MIT). The weights ship inside the PyPI
package ``deepbet==1.0.2`` (TorchScript), so this model works on a fresh install. Torch-free spec."""

from ...catalog import ModelSpec, WeightFile

SPECS = [
    ModelSpec(
        id="deepbet",
        family="deepbet",
        title="deepbet brain extraction (T1 MRI)",
        version="1.0.2",
        dims=3,
        modalities=("MRI",),
        adapter="textseg.models.deepbet.adapter:DeepBetAdapter",
        prompt_kinds=("text",),
        files=(
            WeightFile(
                name="model.pt",
                package="deepbet",
                package_path="data/models/model.pt",
                revision="1.0.2",
                size=8698000,
                sha256="de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd",
            ),
            WeightFile(
                name="bbox_model.pt",
                package="deepbet",
                package_path="data/models/bbox_model.pt",
                revision="1.0.2",
                size=8701922,
                sha256="39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa",
            ),
        ),
        license="MIT",
        citation="Fisch L. et al. deepbet: Fast brain extraction of T1-weighted MRI using Convolutional Neural "
                 "Networks. Computers in Biology and Medicine 2024.",
        homepage="https://github.com/wwu-mmll/deepbet",
        description="Embedded default: answers the prompt 'brain' on T1-weighted MRI of the head.",
        vocabulary=("brain",),
        free_text=False,
    )
]
