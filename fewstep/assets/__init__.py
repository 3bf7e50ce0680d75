"""Small weights that ship with the package: the class-conditional digits and Fashion-MNIST teachers and their
classifiers.

======================  =======================  ======================================================================
name                    directory                what
======================  =======================  ======================================================================
``digits-vp``           ``digits_vp/``           ``DDPMPipeline``: class-conditional ``UNet2DModel``, VP-ε, 1000 steps
``digits-flow``         ``digits_flow/``         the same layout with a ``FlowMatchEulerDiscreteScheduler`` (flow)
``digits-classifier``   ``digits_classifier/``   ``DigitsClassifier`` (``fewstep.eval.digits``): FID features, accuracy
``fashion-vp``          ``fashion_vp/``          the same for Fashion-MNIST (28×28, VP-ε)
``fashion-flow``        ``fashion_flow/``        the flow-matching Fashion-MNIST teacher
``fashion-classifier``  ``fashion_classifier/``  ``ImageClassifier`` (``fewstep.eval.classifier``) on Fashion-MNIST
``moving-digits-flow``  ``moving_digits_flow/``  ``DDPMPipeline`` holding a class-conditional ``WanTransformer3DModel``
                                                 on 8 × 24 × 24 pixel clips of moving digits (flow, video benchmark)
======================  =======================  ======================================================================

Recipes refer to them as ``teacher.pretrained: fewstep:digits-vp``. The teachers take ``class_labels`` 0..9 and the
null class ``num_class_embeds - 1`` (= 10) for classifier-free guidance; images are ``[b, 1, 8, 8]`` (digits) or
``[b, 1, 28, 28]`` (Fashion-MNIST) in ``[-1, 1]``; the moving-digits teacher denoises clips ``[b, 1, 8, 24, 24]``
(``fewstep.data.moving_digits``) and takes the same labels as one one-hot text token.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent

# name -> (directory under fewstep/assets, a file that must exist, the command that rebuilds it)
ASSETS: dict[str, tuple[str, str, str]] = {
    "digits-vp": ("digits_vp", "model_index.json", "python scripts/train_digits_teachers.py --variant vp"),
    "digits-flow": ("digits_flow", "model_index.json", "python scripts/train_digits_teachers.py --variant flow"),
    "digits-classifier": ("digits_classifier", "config.json", "python scripts/train_digits_classifier.py"),
    "fashion-vp": ("fashion_vp", "model_index.json", "python scripts/train_fashion_teachers.py --variant vp"),
    "fashion-flow": ("fashion_flow", "model_index.json", "python scripts/train_fashion_teachers.py --variant flow"),
    "fashion-classifier": ("fashion_classifier", "config.json", "python scripts/train_fashion_classifier.py"),
    "moving-digits-flow": ("moving_digits_flow", "model_index.json", "python scripts/train_moving_digits_teacher.py"),
}


def asset_names() -> list[str]:
    """The names ``asset_path`` accepts."""
    return sorted(ASSETS)


def asset_path(name: str) -> Path:
    """The directory of a shipped asset (``digits-vp``, ``digits-flow``, ``digits-classifier``, ``fashion-vp``,
    ``fashion-flow``, ``fashion-classifier``, ``moving-digits-flow``).

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
        FileNotFoundError: if the asset is not in this installation (the message gives the command that rebuilds it).
    """
    key = name.strip().lower().replace("_", "-")
    if key not in ASSETS:
        from fewstep.registry import unknown_name_message

        raise ValueError(unknown_name_message("fewstep asset", name, asset_names()))
    directory, marker, command = ASSETS[key]
    path = ASSETS_DIR / directory
    if not (path / marker).is_file():
        raise FileNotFoundError(
            f"The fewstep asset {key!r} is missing: expected {path / marker}. Rebuild it from a source checkout "
            f"with `{command}`, or reinstall fewstep (the wheel ships it as package data)."
        )
    return path


__all__ = ["ASSETS", "ASSETS_DIR", "asset_names", "asset_path"]
