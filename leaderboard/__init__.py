"""The PESC leaderboard: a Gradio app over a service layer and a SQL database.

- `leaderboard.service.LeaderboardService`: submit, rank, inspect, administer (no UI);
- `leaderboard.chat.ChatService`: profile-aware chat with the crisis guard;
- `leaderboard.app.build_app` / `launch`: the Gradio 6 Blocks UI;
- `leaderboard.storage.Store`: SQLAlchemy storage (SQLite by default);
- `leaderboard.uploads.read_upload`: zip/JSON safety rules.

Started from the command line with `pesc leaderboard serve --gold GOLD`.
"""
