"""A held-out set for the answer benchmark (bench/answer_quality.py): documents, covered questions, and questions
near their subjects that they do not answer.

The documents were written for this set and are unlike the benchmark's own: a ferry timetable, a laboratory's
rules, a pump's manual, a club's notice and an operations runbook, each with numbers and names a wrong answer
would get wrong. The covered questions, about these documents and about parts of the demo corpus that the
benchmark's own questions do not ask about, name the fact a right answer holds (one of a few strings,
case-insensitive). The uncovered questions sit next to the documents' subjects (the same ferry, the same
laboratory, the cluster the demo corpus describes) and none of the documents answers them: a right answer says
so.

This set is held out: the set was written before the answer path was changed, and no prompt, threshold or
decoding setting is fitted on it. Settings are chosen on the benchmark's own questions; this set checks that
a choice made there carries over.
"""

from __future__ import annotations

DOCUMENTS: dict[str, str] = {
    "heldout/saltholm-ferry.md": (
        "# Saltholm ferry\n\n"
        "The Saltholm ferry leaves Pier 4 every 40 minutes between 6 a.m. and 10 p.m. The crossing takes 25 "
        "minutes. Bicycles travel free, and a car costs 18 euros each way. The ferry, the Alba, was built in "
        "1998 at a yard in Gdansk and carries up to 60 cars. When the wind reaches force 8 the service stops "
        "until the wind drops."
    ),
    "heldout/brandt-lab-rules.md": (
        "# Rules of the Brandt Institute chemistry laboratory\n\n"
        "Safety goggles are worn at all times inside the laboratory. Solvents that boil below 60 degrees Celsius "
        "are handled only under a fume hood. Chemical waste goes into the yellow bins by the north wall, never "
        "down the sink. The emergency shower stands next to door B. The laboratory closes at 7 p.m., and the "
        "laboratory manager, Oskar Lindqvist, signs every request for weekend access."
    ),
    "heldout/aquila-pump.md": (
        "# Aquila solar pump: manual\n\n"
        "The Aquila solar pump lifts water up to 12 metres and delivers 900 litres per hour in full sun. It runs "
        "from one 200-watt panel and needs no battery. Clean the intake filter every two weeks. Before the first "
        "frost, drain the pump and store it indoors; ice cracks its housing."
    ),
    "heldout/linden-chess-club.md": (
        "# Linden Chess Club\n\n"
        "The Linden Chess Club meets every Thursday at 7 p.m. in the back room of the Old Mill cafe. Membership "
        "costs 40 euros a year, and players under 16 join for free. The club championship is held in March with "
        "a time control of 15 minutes plus 10 seconds a move. The club was founded in 1987 by Tove Ekman."
    ),
    "heldout/ingest-runbook.md": (
        "# Runbook: the nightly ingest\n\n"
        "The nightly ingest starts at 01:30 UTC and usually finishes within 40 minutes. If it has not finished "
        "by 03:00 UTC, the on-call engineer is paged. Logs of the ingest are kept for 14 days. Backups of the "
        "index run every night at 04:00 UTC and are kept for 30 days. To rerun a failed ingest, start it again "
        "with the same batch id: documents already written are replaced, not copied."
    ),
}

# (question, strings one of which a correct answer contains)
COVERED: list[tuple[str, tuple[str, ...]]] = [
    ("How often does the Saltholm ferry leave?", ("40 minutes",)),
    ("How long is the crossing on the Saltholm ferry?", ("25",)),
    ("How much does it cost to take a car on the Saltholm ferry?", ("18",)),
    ("Where was the ferry Alba built?", ("Gdansk",)),
    ("When does the Saltholm ferry stop running because of wind?", ("force 8", "8")),
    ("Where does chemical waste go in the Brandt Institute laboratory?", ("yellow",)),
    ("Where is the emergency shower in the Brandt laboratory?", ("door B",)),
    ("Who signs requests for weekend access to the Brandt laboratory?", ("Lindqvist",)),
    ("How high can the Aquila solar pump lift water?", ("12",)),
    ("How often should the intake filter of the Aquila pump be cleaned?", ("two weeks", "2 weeks")),
    ("What should be done with the Aquila pump before the first frost?", ("drain", "indoors")),
    ("On which day does the Linden Chess Club meet?", ("Thursday",)),
    ("How much is a year's membership of the Linden Chess Club?", ("40",)),
    ("Who founded the Linden Chess Club?", ("Ekman",)),
    ("When does the nightly ingest start?", ("01:30", "1:30")),
    ("How long are the logs of the nightly ingest kept?", ("14",)),
    # the demo corpus, parts the benchmark's own questions do not ask about
    ("What is the most workers KEDA runs for the LLM?", ("eight", "8")),
    ("Where does the embedding service go when every GPU is busy?", ("CPU",)),
    ("What kind of work runs on spot GPU nodes?", ("batch", "re-index")),
    ("What does the retriever never share a node with?", ("LLM",)),
]

UNCOVERED: list[str] = [
    "How much does a foot passenger pay on the Saltholm ferry?",
    "Who is the captain of the ferry Alba?",
    "What is the phone number of the Brandt Institute laboratory?",
    "How many people work in the Brandt Institute laboratory?",
    "What does the Aquila solar pump weigh?",
    "What rating do players need to join the Linden Chess Club?",
    "Who won the last championship of the Linden Chess Club?",
    "Which database does the nightly ingest write to?",
    "Which cloud provider does ragpod recommend for its GPU nodes?",
    "How much memory does one Qdrant replica need?",
    "What is the tallest mountain in Africa?",
    "How do I change a flat bicycle tyre?",
]
