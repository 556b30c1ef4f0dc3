"""Synthetic chest X-ray phantom written in the MIMIC-CXR-JPG layout: the project's built-in data.

This is a **teaching phantom, not anatomy**. It draws radiograph-like 8-bit images
(thorax outline, lungs with vessel-like texture, mediastinum, heart, diaphragm domes,
ribs, clavicles, spine, film noise, varying exposure and patient size) and renders each
of the 14 CheXpert findings at a known, documented spatial scale, so that the effect
studied by the paper (coarse findings favour low resolution, fine findings need high
resolution) can be seen, taught and tested on a laptop.

Usage::

    python -m cxrlib.phantom --out data/phantom --subjects 200 --seed 0 --max-size 512
    python -m cxrlib.phantom --out data/phantom --subjects 1500 --max-size 384 --prevalence balanced

Every finding has a spatial scale (mm; at the demo's top resolution, a 128 px square made from a
2500x3056 image, a pixel is about 2.7 x 3.3 mm):

========================== ========== ====================================================================
finding                    scale      what is rendered (and what it must be told apart from)
========================== ========== ====================================================================
Cardiomegaly               global     cardiothoracic ratio (CTR) > 0.5, drawn within 0.08 of 0.5; the heart
                                      has the density of every other soft tissue; only its width relative
                                      to the thorax (235-325 mm, patient size varies) decides
Enlarged Cardiomediastinum global     upper mediastinal width / thoracic width > 0.30, drawn within 0.05
Edema                      coarse     bilateral perihilar haze (sigma 0.2 thorax widths, ~58 mm) in both
                                      lungs at once; every lung also has one-sided smooth bumps as large
Pleural Effusion           medium     fluid level hiding a diaphragm dome, meniscus rising 10-40 mm
Consolidation              medium     dense homogeneous patch 35-60 mm with dark air bronchograms
Pneumonia                  medium     cluster of 3-6 soft blobs (sigma 4-7.5 mm) over 30-60 mm
Atelectasis                medium     plate-like band 50-90 mm long, 4-7 mm thick, in a lower zone
Lung Opacity               medium     faint ill-defined patch, sigma 10-20 mm
Pleural Other              fine       pleural thickening 2.5-4 mm thick, 50-90 mm long along the chest wall
Lung Lesion                fine       2 sharp-edged nodules, radius 3.2-5.2 mm; decoys: 3-6 soft blobs per
                                      image (sigma 5.2-6.5 mm) of the same integrated density
Pneumothorax               fine       thin visceral pleural line 1.6 mm, no lung texture (mean kept) between
                                      it and the wall (10-32 mm); decoys: 1-2 soft skin-fold lines per
                                      image (sigma 5.2 mm) of the same integrated density and course
Fracture                   fine       2 cortical breaks 3.3-5.2 mm across ribs with a local 1.3-2.6 mm step;
                                      decoys: 3-5 soft dips along ribs (sigma 7.8 mm), same density removed
Support Devices            fine       2 thin bright wires 1.6 mm; decoys: 3-5 soft lines per image (sigma
                                      5.2 mm) of the same integrated density
No Finding                 -          no other finding (Support Devices aside) positive or uncertain
========================== ========== ====================================================================

Fine findings *replace* some of their decoys, so the number of bumps or lines in an
image does not depend on the label: once a finding is smaller than a pixel it looks
exactly like its decoy, which is what "invisible when downscaled" means here.

Labels (per study, as in MIMIC): 1 positive, 0 negative, -1 uncertain, blank (not
mentioned). Rendering: 1 -> present; -1 -> present with probability 0.5, faint or
close to the decision threshold; 0 and blank -> absent. The paper's U-Zeros policy
maps -1 and blank to 0, so uncertain studies are label noise, as in MIMIC.
Prevalences: ``prevalence="mimic"`` uses MIMIC-CXR-JPG's label rates with co-occurrence
(see ``MIMIC_LABEL_COUNTS``); ``"balanced"`` draws every finding independently with
18% positives (for small demos: enough positives per finding in ~1,000 test images and
no co-occurrence that would let one finding be predicted from another).

Geometry is in millimetres and rendered directly at the output size (``max_size`` caps
the long side), so one patient looks the same at any size; thin structures are drawn
area-conserving (their integrated density does not depend on the pixel size).
``docs/phantom.md`` has the design and the feasibility study.

Modules: :mod:`~cxrlib.phantom.labels` (label rates and sampling), :mod:`~cxrlib.phantom.design`
(the options), :mod:`~cxrlib.phantom.draw` (canvas and drawing primitives),
:mod:`~cxrlib.phantom.anatomy` (body, lungs, vessels, ribs), :mod:`~cxrlib.phantom.findings`
(one class per finding: its typed plan and how it is drawn, in a registry),
:mod:`~cxrlib.phantom.views` (plan and render one frontal or lateral image),
:mod:`~cxrlib.phantom.writer` (the dataset on disk and the command line) and
:mod:`~cxrlib.phantom.examples` (each finding with and without, for a figure).
"""

from .anatomy import PIXEL_SPACING_SHORT_SIDE_MM, sample_subject
from .findings import CTR_THRESHOLD, MEDIASTINUM_THRESHOLD, REGISTRY, Finding, FindingPlan, plan_findings
from .labels import (
    AIRSPACE_GROUP,
    BALANCED_RATES,
    CARDIAC_GROUP,
    COARSE_FINDINGS,
    FINE_FINDINGS,
    MIMIC_LABEL_COUNTS,
    MIMIC_STUDIES,
    NO_FINDING_EXCLUDES,
    PATHOLOGIES,
    PREVALENCES,
    Design,
    label_rates,
    rendered_presence,
    sample_labels,
)
from .views import finding_examples, plan_frontal, plan_lateral, render_frontal, render_lateral
from .writer import (
    JPEG_QUALITY,
    ensure_phantom,
    get_args_parser,
    image_relpath,
    main,
    make_phantom,
    output_size,
    plan_dataset,
)

_output_size = output_size  # the name older callers use

__all__ = [
    "AIRSPACE_GROUP",
    "BALANCED_RATES",
    "CARDIAC_GROUP",
    "COARSE_FINDINGS",
    "CTR_THRESHOLD",
    "FINE_FINDINGS",
    "JPEG_QUALITY",
    "MEDIASTINUM_THRESHOLD",
    "MIMIC_LABEL_COUNTS",
    "MIMIC_STUDIES",
    "NO_FINDING_EXCLUDES",
    "PATHOLOGIES",
    "PIXEL_SPACING_SHORT_SIDE_MM",
    "PREVALENCES",
    "REGISTRY",
    "Design",
    "Finding",
    "ensure_phantom",
    "FindingPlan",
    "finding_examples",
    "get_args_parser",
    "image_relpath",
    "label_rates",
    "main",
    "make_phantom",
    "output_size",
    "plan_dataset",
    "plan_findings",
    "plan_frontal",
    "plan_lateral",
    "render_frontal",
    "render_lateral",
    "rendered_presence",
    "sample_labels",
    "sample_subject",
]
