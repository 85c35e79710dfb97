"""Shared DICOM helpers used by the agent's ``dicom`` channel and the hub's DICOMweb service.

* :mod:`medagent.dicom.uids` -- UID syntax (PS3.5 §9.1) and the transfer-syntax / SOP-class
  names this package accepts in configuration.
* :mod:`medagent.dicom.dicomjson` -- PS3.18 §F.2 DICOM JSON of a dataset *without bulk data*
  (what the hub's bot and QIDO/metadata responses carry).
* :mod:`medagent.dicom.files` -- reading the header of a Part 10 file without its pixel data,
  and the small identity record (:class:`~medagent.dicom.files.InstanceInfo`) both sides index by.
* :mod:`medagent.dicom.query` -- QIDO-RS / C-FIND matching (PS3.4 §C.2.2.2, PS3.18 §8.3.4)
  as pure functions: a parsed query, and the identifier <-> QIDO parameter translation.
* :mod:`medagent.dicom.multipart` -- multipart/related framing (RFC 2387, PS3.18 §8.6.1.2).

Nothing here does network or database I/O; :mod:`~medagent.dicom.files` reads local files only.
"""
