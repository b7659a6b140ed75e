"""Doc-built fakes of real platforms, run on 127.0.0.1 by the tests."""
