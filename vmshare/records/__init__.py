"""What vmshare keeps on disk: the audit log of every change (``audit``), the
savings history (``history``: the sample format and the JSON-lines reader of
earlier versions; ``history_db``: the SQLite store; ``history_schema``: its
versions and SQL; ``history_query``: the answer for a window;
``history_keeper``: the daemon's side, import, retention and recovery), the
whole-or-nothing file writer (``atomic``) and the schema layer every reader of
an outside JSON record goes through (``schema``).

May import model, errors and config (the history's retention settings) only
(observe makes a history record of its host view).
"""
