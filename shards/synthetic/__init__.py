"""Synthetic stand-ins for credentialed chest X-ray datasets.

render      procedural radiographs with located findings (the shared renderer and its API), composed of
            catalog (finding kinds, spec/result types), geometry (coordinates, grids, textures, shapes),
            anatomy (the patient), findings (lung/pleural/cardiac/bone), devices (tubes, lines, objects),
            rle (mask sidecar coding)
reports     MIMIC-style report text + the CheXpert labels it implies
mimic       the MIMIC-CXR-JPG 2.0.0 corpus generator (`make synth`)
downstream  native-format look-alikes of the downstream datasets
"""
