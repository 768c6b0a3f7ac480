"""The course's ProtoNet training loop on the benchmark's reference (PNG loader, per-task steps),
for time_to_accuracy.py --reference.

    python -m benchmarks.course_protonet --folder DIR [--num_train_iterations N] [--seed S]

DIR is an omniglot_resized-style PNG folder (course_pipeline.write_png_folder). Prints
`Iteration {i}: ...` every 10 iterations and `Validation: ...` on 64 validation tasks every 50,
after the step, in the format of protonet.py. 5-way 5-shot, 15 queries, batch 16, Adam 0.001.
"""

import numpy as np
import torch

import reference
import util
from benchmarks.course_pipeline import course_dataloader

BATCH_SIZE = 16
LEARNING_RATE = 0.001  # protonet.py's default


def metrics_line(results):
    """results: (loss, support accuracy, query accuracy) per batch -> 'loss: ..., ...'."""
    loss, support, query = (np.mean([float(value) for value in values]) for values in zip(*results))
    return f'loss: {loss:.3f}, support accuracy: {support:.3f}, query accuracy: {query:.3f}'


def main(args):
    torch.manual_seed(args.seed)
    network = reference.protonet_network()
    optimizer = torch.optim.Adam(network.parameters(), lr=LEARNING_RATE)
    train = course_dataloader(args.folder, 'train', BATCH_SIZE, 5, 5, 15,
                              BATCH_SIZE * args.num_train_iterations)
    for step, task_batch in enumerate(train):
        optimizer.zero_grad()
        loss, support, query = reference.protonet_step(network, task_batch)
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            print(f'Iteration {step}: {metrics_line([(loss.item(), support, query)])}',
                  flush=True)
        if step % 50 == 0:
            with torch.no_grad():
                results = [reference.protonet_step(network, batch) for batch in
                           course_dataloader(args.folder, 'val', BATCH_SIZE, 5, 5, 15,
                                             BATCH_SIZE * 4)]
            print(f'Validation: {metrics_line(results)}', flush=True)


def parse_args(argv=None):
    parser = util.argument_parser(description=__doc__.split('\n')[0])
    parser.add_argument('--folder', required=True, help='omniglot_resized-style PNG folder')
    parser.add_argument('--num_train_iterations', type=int, default=5000,
                        help='outer-loop updates to train for')
    parser.add_argument('--seed', type=int, default=0, help='seeds the initial weights')
    return parser.parse_args(argv)


if __name__ == '__main__':
    main(parse_args())
