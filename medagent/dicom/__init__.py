"""Shared DICOM helpers used by the agent's ``dicom`` channel and the hub's DICOMweb service.

* :mod:`medagent.dicom.uids` -- UID syntax (PS3.5 §9.1) and the transfer-syntax / SOP-class
  names this package accepts in configuration.
* :mod:`medagent.dicom.dicomjson` -- PS3.18 §F.2 DICOM JSON of a dataset *without bulk data*
  (what the hub's bot and QIDO/metadata responses carry).
* :mod:`medagent.dicom.files` -- reading the header of a Part 10 file without its pixel data,
  and the small identity record (:class:`~medagent.dicom.files.InstanceInfo`) both sides index by.
* :mod:`medagent.dicom.query` -- QIDO-RS / C-FIND matching (PS3.4 §C.2.2.2, PS3.18 §8.3.4)
  as pure functions: a parsed query, and the identifier <-> QIDO parameter translation.

Pure helpers above (local files only). The agent-side services of the ``dicom`` channel
(:mod:`medagent.channels.dicom`) that talk to other machines:

* :mod:`medagent.dicom.hubweb` -- the agent's QIDO-RS / WADO-RS client of the hub;
* :mod:`medagent.dicom.retrieve` -- C-FIND / C-GET / C-MOVE SCP answered through it;
* :mod:`medagent.dicom.upload` -- the ``application/dicom`` file uploader (STOW-RS or Binary);
* :mod:`medagent.dicom.scu` -- the C-STORE SCU behind ``$push`` to ``dicom://AE@host:port``.
"""
