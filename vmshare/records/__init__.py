"""What vmshare keeps on disk: the audit log of every change (``audit``), the
savings history (``history``), the whole-or-nothing file writer (``atomic``)
and the schema layer every reader of an outside JSON record goes through
(``schema``).

May import model and errors only (observe makes a history record of its host view).
"""
