"""Prototypical networks on TDC Metabolism: 2-way tasks of molecules, each a 1024-bit Morgan
fingerprint, embedded by a small fully connected network and classified by the same ProtoNet
as Omniglot."""

from torch import nn

import layers
import metabolism
import protonet
import training
import util

NUM_HIDDEN = 500
VAL_INTERVAL = 2000
SAVE_INTERVAL = 2000
# Tasks per validation: the assignment's script validates on 601 batches of 4 fresh tasks; 16
# tasks (the Omniglot scripts' batch_size * 4) give an interval too wide to read a curve.
NUM_VAL_TASKS = 2400


class FCNet(nn.Module):
    """Two blocks of [Linear -> batch norm -> LeakyReLU]: 1024 -> 500 -> 500, a 500-d embedding.

    A function of one task's molecules, so the batch norms use that task's statistics
    (nn.BatchNorm1d in train mode on one task), as the conv network does on Omniglot.
    """

    def __init__(self, num_inputs=metabolism.NUM_BITS, num_hidden=NUM_HIDDEN):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(num_inputs, num_hidden), layers.TaskBatchNorm(num_hidden), nn.LeakyReLU(),
            nn.Linear(num_hidden, num_hidden), layers.TaskBatchNorm(num_hidden), nn.LeakyReLU())

    def forward(self, features):
        """Embeds one task's molecules.

        Args:
            features (Tensor): fingerprints, shape (examples, num_inputs)

        Returns:
            a Tensor of shape (examples, num_hidden)
        """
        return self.layers(features)


def main(args):
    training.check_common_args(args)
    util.check_positive(learning_rate=args.learning_rate)
    training.main(args, metabolism.MetabolismTasks(args.datadir, args.num_way, args.num_support,
                                                   args.num_query, args.seed, args.fingerprint),
                  lambda log_dir, device: protonet.ProtoNet(
                      args.learning_rate, log_dir, device, args.compile, args.backend,
                      learner=FCNet(), val_interval=VAL_INTERVAL, save_interval=SAVE_INTERVAL,
                      bio=True, amp=args.amp, tasks=args.tasks, num_way=args.num_way),
                  default_log_dir(args), num_val_tasks=NUM_VAL_TASKS)


def default_log_dir(args):
    """protonet.py's, for the metabolism data; a fingerprint other than the assignment's bits
    is named at the end."""
    log_dir = protonet.default_log_dir(args, 'metabolism')
    return log_dir if args.fingerprint == 'bits' else f'{log_dir}.fingerprint_{args.fingerprint}'


def parse_args(argv=None):
    """protonet.py's flags (8000 iterations by default, as run_bio.sh) plus --datadir."""
    parser = util.argument_parser('Train a ProtoNet on TDC Metabolism!')
    protonet.add_protonet_args(parser, num_train_iterations=8000)
    parser.set_defaults(num_way=metabolism.NUM_WAY)  # protonet.py's 5 cannot work: binary labels
    parser.add_argument('--datadir', type=str, default='./data/metabolism',
                        help='folder of metabolism_data_new.pkl or the raw TDC files')
    parser.add_argument('--fingerprint', type=str, default='bits',
                        choices=metabolism.FINGERPRINTS,
                        help="a molecule's 1024 features, folded radius-2 Morgan fingerprints: "
                             "'bits' (the assignment's), 'counts', or 'fcfp_counts' (counts of "
                             'the pharmacophoric-feature variant); each is cached apart')
    return parser.parse_args(argv)


if __name__ == '__main__':
    util.cli(lambda: main(parse_args()))
