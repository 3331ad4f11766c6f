"""MIMIC-style free-text reports for the synthetic corpus, with the CheXpert labels they imply.

    write_report(rng, mentions, views) -> Report(text, labels, style)

`mentions` are the study's drawn findings (FindingSpec with side/zone/severity/shape resolved) each
flagged certain or uncertain. Every drawn finding is described (FINDINGS: a detailed sentence,
IMPRESSION: a short one), with location words (right/left/bilateral; upper/mid/lower, base, apex),
several phrasings per finding, and uncertain ones hedged ("possible ...", "cannot exclude ...").
Absent findings are sometimes negated ("No pneumothorax."), never ones that were drawn.

Labels follow the sentences that made it into the text, like the CheXpert labeller: a sentence
carries {label: 1.0 | -1.0 | 0.0}; a label takes the strongest value over the text
(1.0 > -1.0 > 0.0), unmentioned labels are None (blank), and "No Finding" is 1.0 only for a study
with nothing drawn.

Text layout: every line starts with a space (" FINAL REPORT" first, "  "-indented like MIMIC), upper-case
section headers followed by a colon (EXAMINATION, INDICATION, TECHNIQUE, COMPARISON, FINDINGS,
IMPRESSION), body text wrapped at 76 columns, blank lines as " ". The indication may name a suspected
disease ("r/o pneumonia"): like MIMIC, labels come from FINDINGS/IMPRESSION only. Messy styles
(REPORT_STYLES, rates in STYLE_WEIGHTS): impression only, findings only, `CONCLUSION:` instead of
IMPRESSION, the typo `IMPRESSON:`, `FINDINGS AND IMPRESSION:` combined, and no section headers at all.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np

from shards.schema import CHEXPERT_LABELS
from shards.synthetic.render import FindingSpec

REPORT_STYLES = ("standard", "impression_only", "findings_only", "conclusion", "typo", "combined", "no_sections")
STYLE_WEIGHTS = (0.80, 0.04, 0.04, 0.04, 0.03, 0.02, 0.03)
# Kinds the report writer can describe, with the CheXpert label each one shows.
KIND_LABEL = {
    "opacity": "Lung Opacity",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "atelectasis": "Atelectasis",
    "effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
    "cardiomegaly": "Cardiomegaly",
    "enlarged_cardiomediastinum": "Enlarged Cardiomediastinum",
    "edema": "Edema",
    "nodule": "Lung Lesion",
    "mass": "Lung Lesion",
    "fracture": "Fracture",
    "pleural_thickening": "Pleural Other",
    "support_device": "Support Devices",
}
_PARENCHYMA = {"Lung Opacity", "Consolidation", "Pneumonia", "Atelectasis", "Edema", "Lung Lesion"}
_OPACITY = {"Lung Opacity", "Consolidation", "Pneumonia"}

# (sentence, labels it sets to 0.0, labels whose presence forbids it besides its own)
NEGATIONS = (
    ("No pleural effusion.", ("Pleural Effusion",), ()),
    ("No pneumothorax.", ("Pneumothorax",), ()),
    ("There is no pleural effusion or pneumothorax.", ("Pleural Effusion", "Pneumothorax"), ()),
    ("No pneumothorax is seen.", ("Pneumothorax",), ()),
    ("No focal consolidation.", ("Consolidation",), _OPACITY),
    (
        "There is no focal consolidation, pleural effusion or pneumothorax.",
        ("Consolidation", "Pleural Effusion", "Pneumothorax"),
        _OPACITY,
    ),
    ("The lungs are clear without focal consolidation.", ("Consolidation",), _PARENCHYMA),
    ("No focal airspace opacity to suggest pneumonia.", ("Lung Opacity", "Pneumonia"), _PARENCHYMA),
    ("No evidence of pneumonia.", ("Pneumonia",), _OPACITY),
    ("No pulmonary edema.", ("Edema",), ()),
    ("There is no pulmonary vascular congestion or edema.", ("Edema",), ()),
    ("Heart size is normal.", ("Cardiomegaly",), ()),
    ("The cardiac silhouette is not enlarged.", ("Cardiomegaly",), ()),
    ("The cardiomediastinal silhouette is within normal limits.", ("Enlarged Cardiomediastinum",), ("Cardiomegaly",)),
    ("Mediastinal contours are normal.", ("Enlarged Cardiomediastinum",), ()),
    ("No displaced rib fracture.", ("Fracture",), ()),
    ("No pulmonary nodules or masses are identified.", ("Lung Lesion",), ()),
)
# Statements that set no label, with the labels that make them false.
NEUTRAL = (
    ("The lungs are well expanded.", ()),
    ("The hila are unremarkable.", ("Edema", "Lung Lesion")),
    ("Osseous structures are unremarkable.", ("Fracture",)),
    ("Visualized upper abdomen is unremarkable.", ()),
    ("The lungs are clear.", tuple(_PARENCHYMA | {"Pleural Effusion", "Pneumothorax", "Pleural Other"})),
)
NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary process.",
    "No acute intrathoracic abnormality.",
    "No evidence of acute cardiopulmonary disease.",
    "Normal chest radiograph.",
    "No acute cardiopulmonary abnormality.",
)
INDICATIONS = (
    "___-year-old {sex} with cough and fever, r/o pneumonia",
    "___ {sex} with shortness of breath",
    "History: ___{sx} with chest pain",
    "Evaluate for interval change",
    "___-year-old {sex} with hypoxia, eval for edema",
    "Preoperative evaluation",
    "___{sx} s/p fall, assess for fracture",
    "Dyspnea",
    "Line placement",
    "___-year-old {sex} with known malignancy",
)
COMPARISONS = ("___", "None.", "Chest radiograph from ___.", "Prior study ___.", "None available.")


@dataclass(frozen=True)
class Mention:
    """One drawn finding of a study; `uncertain` findings are reported hedged (label -1.0)."""

    spec: FindingSpec
    uncertain: bool = False


@dataclass
class Report:
    text: str
    labels: dict[str, float | None]  # CheXpert label -> 1.0 | 0.0 | -1.0 | None
    style: str


@dataclass
class _Sentence:
    text: str
    labels: dict[str, float]


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _where(rng, side: str, zone: str) -> str:
    """Location phrase: always a side word and a level word."""
    if zone == "upper":
        return _pick(rng, (f"{side} upper lobe", f"{side} upper lung", f"{side} upper zone", f"{side} lung apex"))
    if zone == "middle":
        return _pick(
            rng,
            (f"{side} mid lung", f"{side} mid zone", f"{side} perihilar region")
            + (("right middle lobe",) if side == "right" else ()),
        )
    return _pick(rng, (f"{side} lower lobe", f"{side} lung base", f"{side} base", f"{side} lower lung"))


def _size(sev: float, words=("small", "moderate", "large")) -> str:
    return words[0] if sev < 0.5 else words[1] if sev < 0.8 else words[2]


def _describe(rng, spec: FindingSpec) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]], str, str]:
    """(findings phrasings, impression phrasings, noun phrase, label) of a certain finding.
    Each phrasing is (sentence, extra labels); the kind's own label is added by the caller."""
    kind, side, zone, sev = spec.kind, spec.side, spec.zone, spec.severity
    loc = _where(rng, side, zone) if side in ("right", "left") and zone in ("upper", "middle", "lower") else ""
    if kind == "opacity":
        noun = f"{loc} opacity"
        fnd = [
            (f"There is a focal opacity in the {loc}.", {}),
            (f"Patchy opacity is noted in the {loc}.", {}),
            (f"Ill-defined opacity projects over the {loc}.", {}),
        ]
        imp = [(f"{_cap(loc)} opacity.", {}), (f"Focal {loc} opacity, recommend follow-up.", {})]
    elif kind == "consolidation":
        noun = f"{loc} consolidation"
        fnd = [
            (f"Focal consolidation is present in the {loc}.", {}),
            (f"Dense consolidation in the {loc}.", {}),
            (f"There is consolidation of the {loc} with air bronchograms.", {}),
        ]
        imp = [(f"{_cap(loc)} consolidation.", {})]
    elif kind == "pneumonia":
        noun = f"{loc} pneumonia"
        fnd = [
            (f"Opacity in the {loc} is concerning for pneumonia.", {"Lung Opacity": 1.0}),
            (f"Patchy airspace opacity in the {loc} consistent with pneumonia.", {"Lung Opacity": 1.0}),
            (f"There is a {loc} pneumonia.", {}),
        ]
        imp = [(f"{_cap(loc)} pneumonia.", {}), (f"Findings consistent with {loc} pneumonia.", {})]
    elif kind == "atelectasis":
        noun = f"{loc} atelectasis"
        fnd = [
            (f"Linear atelectasis at the {loc}.", {}),
            (f"Plate-like atelectasis in the {loc}.", {}),
            (f"There is subsegmental atelectasis in the {loc}.", {}),
        ]
        imp = [(f"{_cap(loc)} atelectasis.", {}), (f"Minor {loc} atelectasis.", {})]
    elif kind == "effusion":
        size = _size(sev)
        where = "bilateral pleural effusions" if side == "bilateral" else f"{side} pleural effusion"
        noun = f"{size} {where}"
        angle = "both costophrenic angles" if side == "bilateral" else f"the {side} costophrenic angle"
        fnd = [
            (f"There are {noun}." if side == "bilateral" else f"There is a {noun}.", {}),
            (f"{_cap(size)} {where} with blunting of {angle}.", {}),
            (f"Blunting of {angle} with a meniscus, consistent with {noun}.", {}),
        ]
        imp = [(f"{_cap(noun)}.", {})]
    elif kind == "pneumothorax":
        size = "small apical" if zone == "apical" else _size(sev, ("moderate", "moderate", "large"))
        noun = f"{size} {side} pneumothorax"
        fnd = [
            (f"There is a {noun}.", {}),
            (f"A {side} pneumothorax is present with a visible pleural line at the {side} apex.", {}),
            (f"{_cap(noun)} with absent lung markings peripherally.", {}),
        ]
        imp = [(f"{_cap(noun)}.", {}), (f"{_cap(noun)}. Findings communicated to the referring team.", {})]
    elif kind == "cardiomegaly":
        deg = _size(sev, ("mild", "moderate", "severe"))
        noun = f"{deg} cardiomegaly"
        fnd = [
            (f"The heart is {deg}ly enlarged.", {}),
            (f"{_cap(deg)} cardiomegaly.", {}),
            (f"The cardiac silhouette is {deg}ly enlarged.", {}),
        ]
        imp = [(f"{_cap(noun)}.", {}), (f"{_cap(deg)} enlargement of the cardiac silhouette.", {})]
    elif kind == "enlarged_cardiomediastinum":
        noun = "widening of the mediastinum"
        fnd = [
            ("The mediastinum is widened.", {}),
            ("The upper mediastinal contour is widened.", {}),
            ("Widening of the superior mediastinum.", {}),
        ]
        imp = [("Widened mediastinum.", {}), ("Mediastinal widening, CT recommended.", {})]
    elif kind == "edema":
        deg = _size(sev, ("mild", "moderate", "severe"))
        noun = f"{deg} pulmonary edema"
        fnd = [
            (f"Bilateral perihilar haziness consistent with {deg} pulmonary edema.", {}),
            (f"There is {deg} pulmonary edema.", {}),
            (f"Perihilar opacities in both lungs reflect {deg} interstitial edema.", {}),
        ]
        imp = [(f"{_cap(noun)}.", {}), (f"{_cap(deg)} pulmonary edema, bilateral.", {})]
    elif kind in ("nodule", "mass"):
        cm = (0.8 + 1.2 * sev) if kind == "nodule" else (3.5 + 3.0 * sev)
        noun = f"{cm:.1f} cm {loc} {kind}"
        fnd = [
            (f"A {cm:.1f} cm {kind} is seen in the {loc}.", {}),
            (f"{_cap(loc)} {kind} measuring {cm:.1f} cm.", {}),
            (f"There is a rounded {kind} in the {loc}, approximately {cm:.1f} cm.", {}),
        ]
        imp = [(f"{_cap(noun)}, CT recommended.", {}), (f"{_cap(loc)} pulmonary {kind}.", {})]
    elif kind == "fracture":
        rib = {"upper": "4th", "middle": "6th", "lower": "8th"}[zone]
        noun = f"{side} {rib} rib fracture"
        fnd = [
            (f"There is a fracture of the {side} lateral {rib} rib.", {}),
            (f"Healing fracture of the {side} {rib} rib in the {zone} chest.", {}),
            (f"Nondisplaced {side} {rib} rib fracture.", {}),
        ]
        imp = [(f"{_cap(noun)}.", {})]
    elif kind == "pleural_thickening":
        noun = f"{side} apical pleural thickening" if zone == "apical" else f"{side} lateral pleural thickening"
        fnd = [
            (f"{_cap(noun)}.", {}),
            (f"Pleural thickening along the {side} {'apex' if zone == 'apical' else 'lateral chest wall'}.", {}),
        ]
        imp = [(f"{_cap(noun)}.", {})]
    elif kind == "support_device":
        device = {
            "ett": "endotracheal tube",
            "ng_tube": "enteric tube",
            "central_line": f"{side} central venous catheter",
            "pacemaker": f"{side}-sided pacemaker",
        }[spec.shape]
        noun = device
        fnd = {
            "ett": [
                ("Endotracheal tube terminates approximately 4 cm above the carina.", {}),
                ("An endotracheal tube is in standard position.", {}),
            ],
            "ng_tube": [
                ("An enteric tube courses below the diaphragm with tip in the stomach.", {}),
                ("Nasogastric tube tip projects over the stomach.", {}),
            ],
            "central_line": [
                (f"A {side} central venous catheter terminates in the mid SVC.", {}),
                (f"{_cap(side)}-sided central line with tip at the cavoatrial junction.", {}),
            ],
            "pacemaker": [
                (f"{_cap(side)}-sided pacemaker with leads in the right atrium and right ventricle.", {}),
                (f"A {side} chest wall pacemaker device is in place with intact leads.", {}),
            ],
        }[spec.shape]
        imp = [(f"{_cap(device)} in appropriate position.", {}), (f"{_cap(device)} as described.", {})]
    else:
        raise ValueError(f"write_report: cannot describe finding kind {kind!r} (known: {sorted(KIND_LABEL)})")
    return fnd, imp, noun, KIND_LABEL[kind]


def _finding_sentences(rng, mention: Mention) -> tuple[_Sentence, _Sentence]:
    fnd, imp, noun, label = _describe(rng, mention.spec)
    if not mention.uncertain:
        f_text, f_extra = _pick(rng, fnd)
        i_text, i_extra = _pick(rng, imp)
        return (_Sentence(f_text, {**f_extra, label: 1.0}), _Sentence(i_text, {**i_extra, label: 1.0}))
    hedges = (
        f"Possible {noun}.",
        f"{_cap(noun)} cannot be excluded.",
        f"Cannot exclude {noun}.",
        f"Questionable {noun}.",
        f"Findings may represent {noun}.",
        f"{_cap(noun)} is not excluded.",
    )
    f_text = _pick(rng, hedges)
    extra = {}
    if mention.spec.kind == "pneumonia" and rng.random() < 0.5:
        # The opacity itself is certain; only its cause is hedged.
        loc = noun.replace(" pneumonia", "")
        f_text = f"Opacity in the {loc}; pneumonia cannot be excluded."
        extra = {"Lung Opacity": 1.0}
    return _Sentence(f_text, {**extra, label: -1.0}), _Sentence(_pick(rng, hedges), {label: -1.0})


def _merge(labels: dict[str, float | None], sentence: _Sentence) -> None:
    rank = {1.0: 3, -1.0: 2, 0.0: 1}
    for name, value in sentence.labels.items():
        old = labels.get(name)
        if old is None or rank[value] > rank[old]:
            labels[name] = value


def _wrap(text: str) -> list[str]:
    return [" " + line for line in textwrap.wrap(text, width=76)] or [" "]


def write_report(rng: np.random.Generator, mentions: list[Mention], views: list[str]) -> Report:
    """Report text + CheXpert labels for a study whose drawn findings are `mentions`."""
    present = {KIND_LABEL.get(m.spec.kind, m.spec.kind) for m in mentions}
    style = str(REPORT_STYLES[int(rng.choice(len(REPORT_STYLES), p=STYLE_WEIGHTS))])

    findings: list[_Sentence] = []
    impression: list[_Sentence] = []
    for m in mentions:
        f, i = _finding_sentences(rng, m)
        findings.append(f)
        impression.append(i)
    negatable = [n for n in NEGATIONS if not (set(n[1]) | set(n[2])) & present]
    chosen_labels: set[str] = set()
    for idx in rng.permutation(len(negatable))[: int(rng.integers(1, 5))]:
        text, zeros, _ = negatable[int(idx)]
        if chosen_labels.isdisjoint(zeros):  # do not negate one label twice
            chosen_labels |= set(zeros)
            findings.append(_Sentence(text, {z: 0.0 for z in zeros}))
    neutral = [n for n in NEUTRAL if not set(n[1]) & present]
    for idx in rng.permutation(len(neutral))[: int(rng.integers(0, 3))]:
        findings.append(_Sentence(neutral[int(idx)][0], {}))
    if mentions:
        first = findings[: len(mentions)]
        rest = [findings[len(mentions) + int(i)] for i in rng.permutation(len(findings) - len(mentions))]
        findings = first + rest
        if (
            rng.random() < 0.3
            and any(n[1] == ("Pneumothorax",) for n in negatable)
            and "Pneumothorax" not in chosen_labels
        ):
            impression.append(_Sentence("No pneumothorax.", {"Pneumothorax": 0.0}))
    else:
        impression = [_Sentence(_pick(rng, NORMAL_IMPRESSIONS), {})]

    imp_text = " ".join(s.text for s in impression)
    if len(impression) > 1 and rng.random() < 0.4:  # numbered impressions, as MIMIC often has
        imp_text = " ".join(f"{k}. {s.text}" for k, s in enumerate(impression, 1))
    fnd_text = " ".join(s.text for s in findings)

    frontal = [v for v in views if v in ("PA", "AP")]
    portable = frontal[:1] == ["AP"]
    exam = "CHEST (PORTABLE AP)" if portable else "CHEST (PA AND LAT)"
    technique = "Portable AP chest radiograph." if portable else "Chest PA and lateral."
    sex_word = _pick(rng, ("male", "female"))
    indication = _pick(rng, INDICATIONS).format(sex=sex_word, sx=sex_word[0].upper())
    lines = ["                                 FINAL REPORT"]
    used: list[_Sentence] = []
    if style == "no_sections":
        lines += [f" {exam.replace('CHEST ', 'CHEST RADIOGRAPH ')}", " "] + _wrap(fnd_text + " " + imp_text)
        used = findings + impression
    else:
        lines += [
            f" EXAMINATION:  {exam}",
            " ",
            f" INDICATION:  {indication}",
            " ",
            f" TECHNIQUE:  {technique}",
            " ",
            f" COMPARISON:  {_pick(rng, COMPARISONS)}",
            " ",
        ]
        if style == "combined":
            lines += [" FINDINGS AND IMPRESSION:", " "] + _wrap(fnd_text + " " + imp_text)
            used = findings + impression
        else:
            if style != "impression_only":
                inline = rng.random() < 0.3  # "FINDINGS:  text" on the header line
                lines += _wrap("FINDINGS:  " + fnd_text) if inline else [" FINDINGS:", " "] + _wrap(fnd_text)
                used += findings
            if style != "findings_only":
                header = {"conclusion": "CONCLUSION", "typo": "IMPRESSON"}.get(style, "IMPRESSION")
                lines += ([" "] if style != "impression_only" else []) + [f" {header}:", " "] + _wrap(imp_text)
                used += impression
    labels: dict[str, float | None] = {name: None for name in CHEXPERT_LABELS}
    for sentence in used:
        _merge(labels, sentence)
    if not mentions:
        labels["No Finding"] = 1.0
    return Report("\n".join(lines) + "\n", labels, style)
