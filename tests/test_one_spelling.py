"""Facts spelled once: experiments.py's metabolism run is run_bio.sh's command."""
import experiments


def test_the_metabolism_run_is_run_bio_sh_s_command():
    run = experiments.BY_NAME['metabolism']
    assert run.flags == ('--num_way', '2', '--num_support', '5', '--num_query', '10',
                         '--batch_size', '4', '--learning_rate', '0.0005')
    assert run.iterations == 8000
